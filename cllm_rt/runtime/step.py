"""One forward of the decoding loop, kept apart from the loop (as gpt-fast keeps prefill and decode apart):
the prompt's prefill, a block or token tree's forward over the cache, and its greedy verification.

A block is ``[last final token, draft_1 … draft_{n-1}]`` placed after each row's cached tokens; a token
tree is the same with ``parents`` saying which earlier node each node continues (``None``: a chain, the
Jacobi block). The model's greedy prediction at every node comes back in one forward; the nodes whose
tokens equal their parent's prediction are proven equal to greedy autoregressive decoding.
"""

from __future__ import annotations

import random

import torch

from .. import ops
from ..quantize import Int8Linear
from . import compact
from .attention import CACHE_LENGTHS_KWARG, PAGE_TABLE_KWARG, TREE_PARENTS_KWARG
from .cache import JacobiCache

def prefill(model, cache: JacobiCache, tokens: torch.Tensor, lengths: torch.Tensor,
            sampling: ops.Sampling | None = None) -> tuple[torch.Tensor, list[int]]:
    """Write the prompts into the cache; return each row's first token ``[B]`` (greedy, or sampled per
    ``sampling``) and the rows whose last hidden state is NaN (their token is meaningless: the caller fails
    them).

    ``tokens`` [B, L] holds each prompt from column 0 with junk after ``lengths[b]``: causal attention keeps
    the junk out of every real position, and the cache rows are cut back to ``lengths`` afterwards.
    """
    hidden = forward_block(model, cache, tokens)  # [B, L, d]
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    last = hidden[rows, lengths - 1, None]  # [B, 1, d]
    nan = last.isnan().flatten(1).any(1).nonzero().flatten().tolist()
    cache.commit(lengths, lengths.tolist())
    cache.trim()  # the junk past a shorter prompt goes, and the pages that held it
    # a 1-token "block": the last token, predicting position lengths[b]
    greedy, _ = greedy_verify(model, last, tokens[rows, lengths - 1, None], sampling, lengths[:, None])
    return greedy[:, 0], nan


def forward_block(model, cache: JacobiCache, block: torch.Tensor, depths: torch.Tensor | None = None,
                  parents: torch.Tensor | None = None) -> torch.Tensor:
    """One forward of ``block`` [B, n] placed after each row's cached tokens; returns hidden states [B, n, d].

    ``depths``/``parents`` [B, n] make it a token tree (node i at position ``length + depths[i]``, attending
    to the cache, its ancestors and itself); without them the block is a chain.
    """
    cache.begin_block(block.shape[1])
    offsets = torch.arange(block.shape[1], device=block.device) if depths is None else depths
    found = compact.modules(model)
    if found is not None:
        return compact.forward(model, found, block, cache.lengths[:, None] + offsets, cache, cache.lengths,
                               cache.page_table, parents)
    kwargs = {CACHE_LENGTHS_KWARG: cache.lengths, PAGE_TABLE_KWARG: cache.page_table}
    if parents is not None:
        kwargs[TREE_PARENTS_KWARG] = parents
    out = model.base_model(input_ids=block, position_ids=cache.lengths[:, None] + offsets, cache=cache,
                           use_cache=True, **kwargs)
    return out.last_hidden_state


def greedy_verify(model, hidden: torch.Tensor, block: torch.Tensor, sampling: ops.Sampling | None = None,
                  positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens ``[B, n]`` of the LM head over ``hidden`` [B, n, d] and accepted lengths ``[B]`` of ``block``;
    with ``sampling``, the seeded sampled tokens instead (``positions`` [B, n]: the position each node predicts),
    verified by the same rule (:func:`cllm_rt.ops.sample_verify`)."""
    head = model.get_output_embeddings()
    if type(head) is Int8Linear:  # int8 logits (cllm_rt.quantize), then the same rule
        return ops.logits_verify(head(hidden), block, sampling, positions)
    if sampling is None:
        return ops.greedy_verify(hidden, head.weight, head.bias, block)
    return ops.sample_verify(hidden, head.weight, head.bias, block, sampling, positions)


def jacobi_step(model, cache: JacobiCache, block: torch.Tensor):
    """Forward ``block``; return ``(greedy [B, n], accepted [B], nan [B])``, leaving the cache uncommitted.

    ``nan[b]`` flags NaN hidden states in row b: argmax over NaN logits is well defined but meaningless, so
    the caller raises instead of emitting garbage (checked on the hidden states, d values per token, not V).
    """
    hidden = forward_block(model, cache, block)  # [B, n, d]
    greedy, accepted = greedy_verify(model, hidden, block)
    return greedy, accepted, hidden.isnan().flatten(1).any(1)


def tree_step(model, cache: JacobiCache, tokens: torch.Tensor, depths: torch.Tensor, parents: torch.Tensor,
              chains: bool, sampling: ops.Sampling | None = None, draft_head=None):
    """Forward token trees ``tokens`` [B, n] (``chains``: every row's tree is the chain 0-1-2-…, the plain block);
    return ``(greedy [B, n], accepted [B], path [B, n], nan [B], guesses)`` as :func:`cllm_rt.ops.tree_verify`
    defines them, leaving the cache uncommitted. With ``sampling`` the "greedy" tokens are the seeded sampled
    ones: node i predicts the token at position ``length + depths[i] + 1``, whatever tree it sits in.
    ``guesses``: ``draft_head``'s proposals from the hidden state at each row's last accepted node and the next
    root it predicts, the tokens after that root and the head's probabilities of them ([B, branches, depth]
    each; None without a head); they are only proposals, so the verified output does not depend on them."""
    positions = cache.lengths[:, None] + depths + 1
    hidden = forward_block(model, cache, tokens, depths, None if chains else parents)
    greedy, accepted = greedy_verify(model, hidden, tokens, sampling, positions)
    if chains:
        path = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        path = path.masked_fill(path >= accepted[:, None], -1)
    else:
        accepted, _, path = ops.tree_verify(greedy, tokens, parents)
    guesses = None
    if draft_head is not None:
        last = path.gather(1, (accepted - 1)[:, None])  # [B, 1]: the node whose prediction is the next root
        guesses = draft_head.propose(hidden.gather(1, last[..., None].expand(-1, -1, hidden.shape[2]))[:, 0],
                                     greedy.gather(1, last)[:, 0], model.get_output_embeddings(),
                                     model.get_input_embeddings())
    return greedy, accepted, path, hidden.isnan().flatten(1).any(1), guesses


class PromptGuesses:
    """Seeded guess tokens drawn uniformly from a prompt (the CLLM paper's policy for Jacobi positions that
    have no prediction yet). Drawn on the host: the loop builds its blocks there, without a device sync."""

    def __init__(self, prompt: list[int], seed):
        self.prompt = prompt
        self.random = random.Random(seed)

    def draw(self, width: int) -> list[int]:
        return [self.prompt[int(self.random.random() * len(self.prompt))] for _ in range(width)]
