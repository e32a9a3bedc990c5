"""Routing a Hugging Face model's attention through ``cllm_rt.ops.block_attention``.

transformers looks attention functions up by name in ``AttentionInterface``; we register ours as
``"cllm_rt"`` and switch a model to it only for the duration of a :func:`jacobi_attention` block.

No mask function is registered on purpose: when an implementation has none, transformers skips mask
construction altogether (``attention_mask=None``), and ``block_attention`` derives the exact mask itself
from the per-row cache lengths (query i of row b sees keys ``0 … lengths[b]+i``; in a token tree, the cache
and the block positions of its ancestors and itself, ``tree_attention``). That both saves building a
``[B, 1, n, S_max]`` mask every forward and removes any chance of SDPA's top-left ``is_causal`` alignment.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface

from .. import ops

ATTN_IMPLEMENTATION = "cllm_rt"
CACHE_LENGTHS_KWARG = "cllm_rt_cache_lengths"
PAGE_TABLE_KWARG = "cllm_rt_page_table"
TREE_PARENTS_KWARG = "cllm_rt_tree_parents"  # absent for a chain block


def _block_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             sliding_window=None, softcap=None, **kwargs):
    # query: [B, Hq, n, D]; key, value: the page pools [num_pages, Hkv, page_size, D] that JacobiCache.update
    # returned, laid out per row by the page table
    lengths, page_table = kwargs.get(CACHE_LENGTHS_KWARG), kwargs.get(PAGE_TABLE_KWARG)
    if lengths is None:
        raise RuntimeError("the cllm_rt attention only runs inside cllm_rt decoding (it needs per-row cache lengths)")
    if softcap is not None:
        raise NotImplementedError("attention logit soft-capping is not supported by cllm_rt.ops.block_attention")
    out = cache_attention(query, key, value, lengths, page_table, kwargs.get(TREE_PARENTS_KWARG), scaling)
    return out.transpose(1, 2), None  # HF expects [B, n, Hq, D]


def cache_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                    page_table: torch.Tensor | None, parents: torch.Tensor | None, scale: float | None
                    ) -> torch.Tensor:
    """Attention [B, Hq, n, D] of a block's queries over the paged cache: a chain (``parents`` None,
    ``ops.block_attention``) or a token tree (``ops.tree_attention``)."""
    if parents is None:
        return ops.block_attention(query, keys, values, lengths, scale=scale, page_table=page_table)
    return ops.tree_attention(query, keys, values, lengths, parents, scale=scale, page_table=page_table)


AttentionInterface.register(ATTN_IMPLEMENTATION, _block_attention_forward)


@contextlib.contextmanager
def jacobi_attention(model: torch.nn.Module):
    """Run ``model`` with block attention over a :class:`~cllm_rt.runtime.cache.JacobiCache`, then restore it."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
