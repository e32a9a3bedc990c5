"""A paged KV cache with per-row lengths, for Jacobi decoding.

Each layer owns one pool of pages per K and V, ``[num_pages, Hkv, page_size, D]``; every row owns a list of
page ids (the same ids in every layer), and its position ``s`` lives in page ``pages[s // page_size]`` at
offset ``s % page_size`` (``ops.block_attention``'s ``page_table``). Row ``b`` holds ``lengths[b]`` committed
tokens; a forward over an n-token block writes the block's keys/values at ``lengths[b] … lengths[b]+n-1`` of
every row, taking pages from the free list as a row grows (rows are ragged: no padding lives in the cache).
Committing the accepted prefix is ``lengths += accepted``; the rejected tail is *not* erased, it is simply past
``lengths`` and gets overwritten by the next block, so rollback is O(1) bookkeeping (the same trick as
gpt-fast's static cache). A verified token-tree path whose nodes are not the block's first positions is first
copied into place (``commit_paths``).

Why pages: a row costs the memory of the tokens it holds, not of the group's longest prompt plus its largest
budget; a row that joins a running batch copies only its own pages in (``extend``); a row that leaves hands its
pages back to the free list without moving any other row's (``select_rows``). The pool grows by a quarter or
more when the free list runs dry (an amortized copy), and is freed with the cache.

The cache implements transformers' ``Cache`` interface, so unmodified Hugging Face attention layers call
``cache.update(k, v, layer_idx)``; the attention function registered in :mod:`cllm_rt.runtime.attention` then runs
``block_attention`` over the returned pools with ``lengths`` as the per-row causal offsets and ``page_table``.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

# Positions per page: a multiple of the CUDA kernel's key tile (ops.PAGE_SIZE_MULTIPLE). A row wastes less than
# a page; the CPU kernel's key tiles stop at page ends, and 64 costs no measurable attention time there.
PAGE_SIZE = 64


class JacobiCacheLayer(CacheLayerMixin):
    """One layer's K/V page pools; which pages to write comes from the owning :class:`JacobiCache`."""

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: "JacobiCache"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Heads, head dims, dtype and device come from the first update, as in transformers' StaticLayer.
        def pool(states: torch.Tensor) -> torch.Tensor:
            return states.new_zeros((0, states.shape[1], self.owner.page_size, states.shape[3]))

        self.keys, self.values = pool(key_states), pool(value_states)
        self.is_initialized = True

    def pools(self, heads: int, head_dim: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value pools grown to the owner's page count (zeros of ``like``'s dtype and device for
        ``heads`` x ``head_dim`` first, if no update came yet): for a forward that writes the block's keys and
        values itself at the owner's ``write_index`` (``compact``'s native layers) instead of calling update."""
        if not self.is_initialized:
            states = like.new_empty((1, heads, 0, head_dim))
            self.lazy_initialization(states, states)
        self.reserve()
        return self.keys, self.values

    def reserve(self) -> None:
        """Grow the pools to the owner's page count. New pages are zeros: the reference attention reads a
        whole page, and 0 times a masked-out probability must stay 0 (garbage could be NaN)."""
        missing = self.owner.num_pages - self.keys.shape[0]
        if missing > 0:
            self.keys = torch.cat([self.keys, self.keys.new_zeros((missing,) + self.keys.shape[1:])])
            self.values = torch.cat([self.values, self.values.new_zeros((missing,) + self.values.shape[1:])])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states, value_states: [B, Hkv, n, D] for the block being decoded
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.reserve()
        where = self.owner.write_index
        if isinstance(where[0], int):  # one row, one page: a plain slice copy
            page, start = where
            n = key_states.shape[2]
            self.keys[page, :, start:start + n].copy_(key_states[0])
            self.values[page, :, start:start + n].copy_(value_states[0])
        else:
            pages, offsets = where  # [B, n] each
            # advanced indexing puts the indexed dims first: the target view is [B, n, Hkv, D]
            self.keys[pages, :, offsets] = key_states.transpose(1, 2)
            self.values[pages, :, offsets] = value_states.transpose(1, 2)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.max_len, 0

    def get_seq_length(self) -> int:
        return max(self.owner.lengths_host, default=0)

    def get_max_length(self) -> int:
        return self.owner.max_len

    def move(self, source: tuple[torch.Tensor, torch.Tensor], target: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Copy the keys/values at ``source`` (pages, offsets; 1-D, one per move) to ``target``."""
        if self.is_initialized:
            # advanced indexing reads every source before any target is written
            self.keys[target[0], :, target[1]] = self.keys[source[0], :, source[1]]
            self.values[target[0], :, target[1]] = self.values[source[0], :, source[1]]

    def copy_pages(self, other: "JacobiCacheLayer", source: torch.Tensor, target: torch.Tensor) -> None:
        """Copy ``other``'s pages ``source`` into this layer's pages ``target`` (1-D page ids)."""
        if not other.is_initialized:
            return
        if not self.is_initialized:
            self.lazy_initialization(other.keys, other.values)
        self.reserve()
        self.keys[target] = other.keys[source]
        self.values[target] = other.values[source]


class JacobiCache(Cache):
    """Paged per-layer K/V pools and a committed length per batch row.

    ``lengths`` (device tensor) feeds the attention kernel; ``lengths_host`` (a list) mirrors it so that page
    bookkeeping and the write path need no device sync. ``max_len`` bounds the positions of any row.
    """

    def __init__(self, num_layers: int, lengths: torch.Tensor, max_len: int, page_size: int | None = None):
        if lengths.ndim != 1 or lengths.numel() == 0:
            raise ValueError(f"lengths must be a non-empty 1-D tensor, got shape {tuple(lengths.shape)}")
        page_size = PAGE_SIZE if page_size is None else page_size  # read at call time: tests shrink it
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.max_len = int(max_len)
        self.page_size = int(page_size)
        self.lengths = lengths.to(torch.int64)
        self.lengths_host = [int(x) for x in lengths.tolist()]
        if max(self.lengths_host) > self.max_len:
            raise ValueError(f"a row holds {max(self.lengths_host)} tokens but the cache has {self.max_len} positions")
        super().__init__(layers=[JacobiCacheLayer(self) for _ in range(num_layers)])
        self.num_pages = 0  # pages in every layer's pools
        self.free: list[int] = []  # page ids no row owns
        self.row_pages: list[list[int]] = [self._allocate(self._pages_for(length)) for length in self.lengths_host]
        self.page_table: torch.Tensor | None = None  # [B, most pages of a row] int64, built by begin_block
        self.write_index: tuple | None = None

    @property
    def batch_size(self) -> int:
        return len(self.lengths_host)

    # ------------------------------------------------------------ pages

    def _pages_for(self, positions: int) -> int:
        return math.ceil(positions / self.page_size)

    def _allocate(self, count: int) -> list[int]:
        """Take ``count`` page ids from the free list, growing the pools by at least a quarter when it is short
        (amortized: a pool copy every so many pages, never per join)."""
        if count > len(self.free):
            grow = max(count - len(self.free), self.num_pages // 4)
            self.free.extend(range(self.num_pages + grow - 1, self.num_pages - 1, -1))  # taken lowest first
            self.num_pages += grow
        taken = self.free[len(self.free) - count:][::-1]  # from the end: a list pops there in O(1)
        del self.free[len(self.free) - count:]
        return taken

    def _build_page_table(self) -> None:
        width = max(len(pages) for pages in self.row_pages)
        table = [pages + [0] * (width - len(pages)) for pages in self.row_pages]  # padding: any valid page
        self.page_table = torch.tensor(table, dtype=torch.int64, device=self.lengths.device)

    def _locate(self, rows: list[int], positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(page ids, offsets) of positions of rows, as device tensors."""
        pages = [self.row_pages[b][s // self.page_size] for b, s in zip(rows, positions)]
        offsets = [s % self.page_size for s in positions]
        device = self.lengths.device
        return torch.tensor(pages, device=device), torch.tensor(offsets, device=device)

    # ------------------------------------------------------------ the decoding loop

    def begin_block(self, n: int) -> None:
        """Give every row the pages of an n-token block and prepare where to write it (once per forward,
        shared by all layers)."""
        longest = max(self.lengths_host)
        if longest + n > self.max_len:
            raise ValueError(f"a block of {n} tokens after {longest} cached ones exceeds the cache ({self.max_len})")
        grew = False
        for length, pages in zip(self.lengths_host, self.row_pages):
            missing = self._pages_for(length + n) - len(pages)
            if missing > 0:
                pages.extend(self._allocate(missing))
                grew = True
        if grew or self.page_table is None:
            self._build_page_table()
        start = self.lengths_host[0]
        if self.batch_size == 1 and start % self.page_size + n <= self.page_size:
            # Measured: a slice copy per layer beats index_put here, and one per page touched does not.
            self.write_index = (self.row_pages[0][start // self.page_size], start % self.page_size)
        else:
            positions = self.lengths[:, None] + torch.arange(n, device=self.lengths.device)  # [B, n]
            pages = self.page_table.gather(1, positions // self.page_size)
            self.write_index = (pages, positions % self.page_size)

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
            rows, source, target = zip(*moves)
            source, target = self._locate(rows, source), self._locate(rows, target)
            for layer in self.layers:
                layer.move(source, target)
        self.commit(accepted, [len(path) for path in paths])

    def trim(self) -> None:
        """Hand back the pages past every row's committed tokens: a prefill writes each row up to the group's
        longest prompt, and a row should hold only its own."""
        for b, pages in enumerate(self.row_pages):
            keep = self._pages_for(self.lengths_host[b])
            if len(pages) > keep:
                self.free.extend(pages[keep:])
                del pages[keep:]
                self.page_table = None

    # ------------------------------------------------------------ rows joining and leaving

    def extend(self, other: "JacobiCache") -> "JacobiCache":
        """Append ``other``'s rows (prefilled elsewhere: requests joining a running batch); returns self. Only
        the pages holding their committed tokens are copied, nothing of the rows already here."""
        if len(other.layers) != len(self.layers) or other.page_size != self.page_size:
            raise ValueError(f"cannot merge caches of {len(self.layers)} and {len(other.layers)} layers, pages of "
                             f"{self.page_size} and {other.page_size} positions")
        self.max_len = max(self.max_len, other.max_len)
        source = [pages[:self._pages_for(length)] for length, pages in zip(other.lengths_host, other.row_pages)]
        target = [self._allocate(len(pages)) for pages in source]
        flat_source = [p for pages in source for p in pages]
        if flat_source:
            device = self.lengths.device
            from_pages = torch.tensor(flat_source, device=device)
            to_pages = torch.tensor([p for pages in target for p in pages], device=device)
            for mine, theirs in zip(self.layers, other.layers):
                mine.copy_pages(theirs, from_pages, to_pages)
        self.row_pages += target
        self.lengths = torch.cat([self.lengths, other.lengths])
        self.lengths_host = self.lengths_host + other.lengths_host
        self.page_table = None
        return self

    def select_rows(self, rows: torch.Tensor, rows_host: list[int]) -> None:
        """Keep only the given batch rows; the others' pages go back to the free list (no K/V is moved)."""
        kept = set(rows_host)
        for b, pages in enumerate(self.row_pages):
            if b not in kept:
                self.free.extend(pages)
        self.row_pages = [self.row_pages[r] for r in rows_host]
        self.lengths = self.lengths.index_select(0, rows)
        self.lengths_host = [self.lengths_host[r] for r in rows_host]
        self.page_table = None
