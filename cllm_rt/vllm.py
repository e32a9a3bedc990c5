"""cllm_rt's drafting inside vLLM: a proposer for vLLM's out-of-tree speculative decoding (V1 runner, 0.32).

    vllm serve MODEL --speculative-config '{"model": "cllm_rt.vllm.Proposer", "num_speculative_tokens": 8}'

vLLM imports the class named in ``speculative_config.model``, builds it with the engine's config, calls
``load_model(model)`` once and, after every step, ``propose(sampled_token_ids, num_tokens_no_spec,
token_ids_cpu)``: per batch slot, the tokens that step made final and the slot's whole sequence (prompt and
output, those tokens included); it takes back one chain of draft tokens per slot, which its rejection
sampler verifies in the next forward. The drafts come from cllm_rt's own sources
(:mod:`cllm_rt.runtime.drafts`): suffix matches in the request's own context and, if enabled, in a corpus
of earlier requests, merged into a scored trie whose likeliest chain is proposed.

vLLM tells a proposer neither how many drafts it accepted nor how long a step took, nor how many drafts to
make this step, so all three are worked out here. A request's next call brings ``accepted + 1`` sampled
tokens: that teaches the calibration (:class:`AcceptanceStats`); the time from handing drafts over to the
next call is the step that verified them: that teaches the step cost (:class:`StepCost`); and the two choose
each step's draft length, up to ``num_speculative_tokens``, to maximise expected tokens per second
(:func:`cllm_rt.runtime.cost.choose_budget`), as ``cllm_rt.generate`` does for its trees.

Drafts never change vLLM's greedy output: its verifier keeps only tokens equal to the target's argmax.

The corpus is chosen by ``CLLM_RT_VLLM_CORPUS`` (the engine's worker process reads it): ``off`` (the
default) or ``shared`` (every finished request of this engine, whoever sent it: a request's speed can then
reveal whether another's output continued its text, so share only among callers who may see each other's
outputs). vLLM gives a proposer no request id or tenant, so a per-tenant corpus cannot be built here.

This module imports nothing from vLLM (its interface is plain lists and arrays), so it loads and is tested
without vLLM installed. What cannot cross the interface, and the change that would let it: docs/VLLM.md.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from .runtime.cost import StepCost, choose_budget
from .runtime.drafts import AcceptanceStats, Corpus, DraftTree, NgramIndex

CORPUS_ENV = "CLLM_RT_VLLM_CORPUS"
CORPUS_MODES = ("off", "shared")
MAX_MATCHES = 8  # earlier occurrences continued per lookup
EXPLORE_EVERY = 16  # one step in this many may draft longer than the cost model likes, to measure it
FINGERPRINT = 16  # leading and trailing tokens compared to tell a slot's request from a new one in that slot


@dataclass
class _Request:
    """What is known of the request in one batch slot: its tokens, and the chain last proposed for it."""

    history: NgramIndex  # prompt + output as of the last call
    proposed: DraftTree  # root only when nothing was proposed

    def continues(self, sampled: list[int], length: int, tokens) -> bool:
        """Whether the slot still holds this request, now ``length`` tokens long after ``sampled`` were made
        final: the old tokens are in place and the sampled ones begin with the drafts accepted."""
        known = self.history.tokens
        before = len(known)
        accepted = len(sampled) - 1
        return (length == before + len(sampled)
                and tokens[:min(FINGERPRINT, before)].tolist() == known[:FINGERPRINT]
                and tokens[max(0, before - FINGERPRINT):before].tolist() == known[-FINGERPRINT:]
                and accepted < len(self.proposed) and list(sampled[:accepted]) == self.proposed.tokens[1:1 + accepted])


class Proposer:
    """A vLLM custom proposer drafting from the request's context and (optionally) a corpus; see the module.

    ``vllm_config``: vLLM's ``VllmConfig`` (only ``speculative_config.num_speculative_tokens`` and
    ``model_config.max_model_len`` are read). ``corpus``: ``"off"`` or ``"shared"``; default: the
    ``CLLM_RT_VLLM_CORPUS`` environment variable, else ``"off"``.
    """

    def __init__(self, vllm_config, *, corpus: str | None = None):
        self.max_draft = int(vllm_config.speculative_config.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        if self.max_draft < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.max_draft}")
        mode = os.environ.get(CORPUS_ENV, "off") if corpus is None else corpus
        if mode not in CORPUS_MODES:
            raise ValueError(f"corpus ({CORPUS_ENV}) must be one of {list(CORPUS_MODES)}, got {mode!r}")
        self.corpus = Corpus() if mode == "shared" else None
        self.acceptance = AcceptanceStats()
        self.cost = StepCost()
        self.requests: dict[int, _Request] = {}  # batch slot -> request
        self.calls = 0
        self.proposed_tokens = self.accepted_tokens = 0  # drafts handed over / accepted by vLLM's verifier
        self._handed: tuple[set[int], int, float] | None = None  # last call's drafting slots, tokens, time

    def load_model(self, model) -> None:
        """vLLM hands over the target model; drafting from token ids needs nothing from it."""

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec, token_ids_cpu,
                slot_mappings=None) -> list[list[int]]:
        """One draft chain per batch slot (empty where a slot is not decoding or nothing is worth verifying).

        ``num_tokens_no_spec[i]``: slot i's sequence length; ``token_ids_cpu[i]``: its tokens (a numpy row);
        ``slot_mappings``: the KV cache's layout, not needed to draft from tokens.
        """
        start = time.perf_counter()
        rows: dict[int, _Request] = {}
        continued = set()
        for slot, sampled in enumerate(sampled_token_ids):
            if not sampled:  # prefilling, or its step was discarded: vLLM drafts nothing for it either
                continue
            request, kept = self._follow(slot, sampled, int(num_tokens_no_spec[slot]), token_ids_cpu[slot])
            rows[slot] = request
            if kept:
                continued.add(slot)
        for slot in [s for s in self.requests if s >= len(sampled_token_ids)]:
            self._retire(self.requests.pop(slot))
        if self._handed is not None:
            slots, tokens, handed_at = self._handed
            if slots == continued == set(rows):  # the same rows, nothing else in the step: a fair timing
                self.cost.observe(tokens, start - handed_at)
        drafts = self._draft(rows, num_tokens_no_spec, len(sampled_token_ids))
        self._handed = (set(rows), sum(1 + len(d) for d in drafts), time.perf_counter())
        return drafts

    def _follow(self, slot: int, sampled: list[int], length: int, tokens) -> tuple[_Request, bool]:
        """The request in ``slot`` brought up to ``length`` tokens, and whether it is the one seen there at the
        last call (then its last proposal is scored by what vLLM accepted)."""
        known = self.requests.get(slot)
        if known is not None and known.continues(sampled, length, tokens):
            accepted = len(sampled) - 1
            self.acceptance.observe(known.proposed, list(range(accepted + 1)))
            self.accepted_tokens += accepted
            known.history.extend(tokens[len(known.history):length].tolist())
            return known, True
        if known is not None:
            self._retire(known)
        history = NgramIndex()
        history.extend(tokens[:length].tolist())
        self.requests[slot] = _Request(history, DraftTree.rooted_at(history.tokens[-1]))
        return self.requests[slot], False

    def _retire(self, request: _Request) -> None:
        """A request left its slot (finished, or moved by vLLM's batch compaction): its text joins the corpus."""
        if self.corpus is not None:
            self.corpus.add(request.history.tokens)

    def _draft(self, rows: dict[int, _Request], num_tokens_no_spec, slots: int) -> list[list[int]]:
        room = {slot: self.max_model_len - 1 - int(num_tokens_no_spec[slot]) for slot in rows}  # drafts the length allows
        chains = {slot: self._chain(request, min(self.max_draft, room[slot])) for slot, request in rows.items()}
        budget = choose_budget(self.cost, [chain.scores[1:] for chain in chains.values()], self.max_draft + 1,
                               explore=self.calls % EXPLORE_EVERY == EXPLORE_EVERY - 1) if chains else 1
        self.calls += 1
        drafts = [[] for _ in range(slots)]
        for slot, chain in chains.items():
            rows[slot].proposed = chain.best(budget)
            drafts[slot] = rows[slot].proposed.tokens[1:]
            self.proposed_tokens += len(drafts[slot])
        return drafts

    def _chain(self, request: _Request, depth: int) -> DraftTree:
        """The likeliest chain of ``depth`` tokens at most from the request's context and the corpus."""
        history = request.history
        tree = DraftTree.rooted_at(history.tokens[-1])
        if depth < 1:
            return tree
        matched, found = history.continuations(history.tokens, depth, MAX_MATCHES)
        tree.add_trie(found, self.acceptance.calibration, "context", matched)
        if self.corpus is not None:
            matched, found = self.corpus.continuations(history.tokens, depth, MAX_MATCHES, min_n=2)
            tree.add_trie(found, self.acceptance.calibration, "corpus", matched)
        return tree.best_chain(depth)
