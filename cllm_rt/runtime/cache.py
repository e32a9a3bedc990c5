"""A preallocated KV cache with per-row lengths, for Jacobi decoding.

Each layer owns two static buffers ``[B, Hkv, S_max, D]``. Row ``b`` holds ``lengths[b]`` committed tokens;
a forward over an n-token block writes the block's keys/values at ``lengths[b] … lengths[b]+n-1`` of every
row (rows are ragged: no padding lives in the cache). Committing the accepted prefix is ``lengths += accepted``;
the rejected tail is *not* erased, it is simply past ``lengths`` and gets overwritten by the next block, so
rollback is O(1) bookkeeping (the same trick as gpt-fast's static cache). A verified token-tree path whose
nodes are not the block's first positions is first copied into place (``commit_paths``).

The cache implements transformers' ``Cache`` interface, so unmodified Hugging Face attention layers call
``cache.update(k, v, layer_idx)``; the attention function registered in :mod:`cllm_rt.runtime.attention` then runs
``block_attention`` over the returned buffers with ``lengths`` as the per-row causal offsets.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class JacobiCacheLayer(CacheLayerMixin):
    """One layer's static K/V buffers; where to write comes from the owning :class:`JacobiCache`."""

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: "JacobiCache"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Shapes, dtype and device come from the first update, as in transformers' StaticLayer.
        batch, heads, _, head_dim = key_states.shape
        shape = (batch, heads, self.owner.max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(shape[:-1] + (value_states.shape[-1],), dtype=value_states.dtype,
                                  device=value_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states, value_states: [B, Hkv, n, D] for the block being decoded
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.owner.uniform_start
        if start is not None:  # every row at the same length (always true for batch 1): a plain slice copy
            n = key_states.shape[2]
            self.keys[:, :, start:start + n].copy_(key_states)
            self.values[:, :, start:start + n].copy_(value_states)
        else:
            rows, positions = self.owner.write_index  # [B, 1], [B, n]
            # advanced indexing puts the indexed dims first: the target view is [B, n, Hkv, D]
            self.keys[rows, :, positions] = key_states.transpose(1, 2)
            self.values[rows, :, positions] = value_states.transpose(1, 2)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.max_len, 0

    def get_seq_length(self) -> int:
        return max(self.owner.lengths_host, default=0)

    def get_max_length(self) -> int:
        return self.owner.max_len

    def move(self, rows: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> None:
        """Copy the keys/values at ``source`` positions to ``target`` positions (1-D, one per move)."""
        if self.is_initialized:
            # advanced indexing reads every source before any target is written
            self.keys[rows, :, target] = self.keys[rows, :, source]
            self.values[rows, :, target] = self.values[rows, :, source]

    def extend(self, other: "JacobiCacheLayer") -> None:
        """Append ``other``'s rows (same heads and dtype; positions padded to the owner's ``max_len``)."""
        def grow(mine: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
            pad = self.owner.max_len - theirs.shape[2]
            theirs = torch.nn.functional.pad(theirs, (0, 0, 0, pad)) if pad else theirs
            mine = torch.nn.functional.pad(mine, (0, 0, 0, self.owner.max_len - mine.shape[2]))
            return torch.cat([mine, theirs], 0)

        self.keys, self.values = grow(self.keys, other.keys), grow(self.values, other.values)

    def select_rows(self, rows: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys = self.keys.index_select(0, rows)
            self.values = self.values.index_select(0, rows)


class JacobiCache(Cache):
    """Static per-layer K/V buffers of ``max_len`` positions and a committed length per batch row.

    ``lengths`` (device tensor) feeds the attention kernel; ``lengths_host`` (a list) mirrors it so the
    write path can pick a slice copy without a device sync.
    """

    def __init__(self, num_layers: int, lengths: torch.Tensor, max_len: int):
        if lengths.ndim != 1 or lengths.numel() == 0:
            raise ValueError(f"lengths must be a non-empty 1-D tensor, got shape {tuple(lengths.shape)}")
        self.max_len = int(max_len)
        self.lengths = lengths.to(torch.int64)
        self.lengths_host = [int(x) for x in lengths.tolist()]
        if max(self.lengths_host) > self.max_len:
            raise ValueError(f"a row holds {max(self.lengths_host)} tokens but the cache has {self.max_len} positions")
        super().__init__(layers=[JacobiCacheLayer(self) for _ in range(num_layers)])
        self.uniform_start: int | None = None
        self.write_index: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return len(self.lengths_host)

    def begin_block(self, n: int) -> None:
        """Prepare the write positions of an n-token block (once per forward, shared by all layers)."""
        longest = max(self.lengths_host)
        if longest + n > self.max_len:
            raise ValueError(f"a block of {n} tokens after {longest} cached ones exceeds the cache ({self.max_len})")
        if min(self.lengths_host) == longest:
            self.uniform_start, self.write_index = longest, None
        else:
            offsets = torch.arange(n, device=self.lengths.device)
            rows = torch.arange(self.batch_size, device=self.lengths.device)[:, None]
            self.uniform_start, self.write_index = None, (rows, self.lengths[:, None] + offsets)

    def commit(self, accepted: torch.Tensor, accepted_host: list[int]) -> None:
        """Keep the first ``accepted[b]`` tokens of the last block in row b; the rest is dropped in O(1)."""
        self.lengths = self.lengths + accepted
        self.lengths_host = [length + a for length, a in zip(self.lengths_host, accepted_host)]

    def commit_paths(self, paths: list[list[int]], accepted: torch.Tensor) -> None:
        """Keep, per row b, the last block's nodes ``paths[b]`` (node indices, root first) as its next
        ``len(paths[b])`` tokens: an accepted token-tree path. Nodes already in place (a chain's prefix, or the
        best branch that the tree's depth-first order puts first) cost nothing; the others are copied into
        place, O(accepted tokens) per layer, and the rest of the block is dropped in O(1) as in ``commit``."""
        moves = [(b, self.lengths_host[b] + node, self.lengths_host[b] + k)
                 for b, path in enumerate(paths) for k, node in enumerate(path) if node != k]
        if moves:
            rows, source, target = torch.tensor(moves, device=self.lengths.device).unbind(1)
            for layer in self.layers:
                layer.move(rows, source, target)
        self.commit(accepted, [len(path) for path in paths])

    def extend(self, other: "JacobiCache") -> "JacobiCache":
        """Append ``other``'s rows (prefilled elsewhere: requests joining a running batch); returns self."""
        if len(other.layers) != len(self.layers):
            raise ValueError(f"cannot merge caches of {len(self.layers)} and {len(other.layers)} layers")
        self.max_len = max(self.max_len, other.max_len)
        for mine, theirs in zip(self.layers, other.layers):
            mine.extend(theirs)
        self.lengths = torch.cat([self.lengths, other.lengths])
        self.lengths_host = self.lengths_host + other.lengths_host
        return self

    def select_rows(self, rows: torch.Tensor, rows_host: list[int]) -> None:
        """Keep only the given batch rows (finished rows stop costing memory traffic and compute)."""
        for layer in self.layers:
            layer.select_rows(rows)
        self.lengths = self.lengths.index_select(0, rows)
        self.lengths_host = [self.lengths_host[r] for r in rows_host]
