"""Exact greedy generation over any supported Hugging Face decoder-only model, many tokens per forward.

Each step builds one token tree per row, rooted at the row's last final token: the Jacobi iterate (the
previous step's predictions past the accepted token; a CLLM is trained to make them right), suffix
drafts from the row's own context and from a corpus of earlier outputs (:mod:`cllm_rt.runtime.drafts`).
One forward runs every node over the KV cache with tree attention; a node is proven equal to greedy
autoregressive (AR) decoding when its token is its parent's greedy prediction, so the deepest such path
plus that node's own prediction is committed (its keys/values moved into place) and the rest dropped.
How many nodes to verify is chosen per step to maximise expected tokens per second
(:mod:`cllm_rt.runtime.cost`): at least one token is final per forward, so the output is *exactly* the
greedy AR output, in at most as many forwards.

``drafts=None`` is plain Jacobi decoding (Santilli et al. 2023; CLLMs, Kou et al. 2024): a fixed block of
``block_size`` tokens, the previous predictions then seeded guesses drawn uniformly from the row's own
prompt (the CLLM paper's policy); ``block_size=1`` with it is plain AR decoding in the same runtime.

The loop keeps prefill and decode apart (:mod:`cllm_rt.runtime.step`, as gpt-fast does) and does one host
sync per step: accepted counts, paths and greedy tokens travel to the host together for tree building,
streaming, EOS and budget bookkeeping.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from dataclasses import dataclass, field, replace

import torch

from .. import ops
from ..draft_head import attached
from ..quantize import Int8Linear
from .attention import jacobi_attention
from .cache import JacobiCache
from .cost import StepCost, choose_budget
from .drafts import SOURCES, AcceptanceStats, Corpus, DraftTree, NgramIndex
from .inputs import NOT_GIVEN, check_model, check_positions, nan_error, resolve_special_tokens, unpad_prompts
from .linears import routed_linears
from .sampling import SamplingParams, batch_sampling, sampling_from_config
from .step import PromptGuesses, prefill, tree_step

DRAFT_DEPTH = 16  # longest suffix-draft continuation
MAX_MATCHES = 8  # earlier occurrences continued per lookup
EXPLORE_EVERY = 16  # one step in this many may verify a larger, little-measured tree (cost.choose_budget)


@dataclass
class GenerationStats:
    forward_passes: int = 0  # decode forwards, prefill excluded
    new_tokens: list[int] = field(default_factory=list)  # per input row
    accepted_histogram: list[int] = field(default_factory=list)  # [k] = row-steps that made k tokens final
    accepted_by_source: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    proposed_by_source: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))
    budgets: dict[int, int] = field(default_factory=dict)  # nodes per row verified -> steps
    prefill_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Mean tokens made final per row per decode forward (1.0 for autoregressive decoding)."""
        steps = sum(self.accepted_histogram)
        return sum(k * c for k, c in enumerate(self.accepted_histogram)) / steps if steps else 0.0


@dataclass
class GenerationOutput:
    sequences: torch.LongTensor  # [B, prompt + new]: the inputs as given, then new tokens (pad after a row ends)
    stats: GenerationStats
    seed: int | None = None  # the sampling seed (row b used seed + b): given or drawn; None when greedy


@dataclass
class _Row:
    """One active batch row: its output so far and what its next tree is built from."""

    index: int  # the caller's handle (for generate: the input row)
    prompt: list[int]
    max_new_tokens: int
    guesses: PromptGuesses
    history: NgramIndex  # prompt + final tokens
    output: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # final tokens not yet emitted
    jacobi: list[int] = field(default_factory=list)  # the previous step's predictions past the accepted token
    # the draft head's chains past the next root, each with the head's probability of every token
    head: list[tuple[list[int], list[float]]] = field(default_factory=list)
    steps: int = 0  # decode forwards this row took part in
    sampling: SamplingParams | None = None  # None: greedy
    corpus: Corpus | None = None  # where its "corpus" drafts come from and its finished answer goes

    @property
    def depth_left(self) -> int:
        """How deep a tree may usefully go: the tokens the row may still take, minus the root's successor."""
        return self.max_new_tokens - len(self.output) - 1

    def jacobi_block(self, width: int) -> DraftTree:
        """Plain Jacobi decoding: the root, the previous predictions, then guesses, ``width`` tokens in all."""
        tree = DraftTree.rooted_at(self.history.tokens[-1])
        chain = self.jacobi[:width - 1]
        tree.add_branch(chain + self.guesses.draw(width - 1 - len(chain)), [0.0] * (width - 1), [1.0] * (width - 1),
                        "jacobi")
        return tree

    def tree(self, sources, block_size: int, stats: AcceptanceStats, corpus: Corpus, vocab: int) -> DraftTree:
        """Every source's drafts merged and scored."""
        tree = DraftTree.rooted_at(self.history.tokens[-1])
        width = min(block_size - 1, self.depth_left)
        if "jacobi" in sources and width > 0:
            chain = self.jacobi[:width]
            tree.add_trie([chain + self.guesses.draw(width - len(chain))], stats.calibration, "jacobi")
        depth = min(DRAFT_DEPTH, self.depth_left)
        if "context" in sources and depth > 0:
            matched, found = self.history.continuations(self.history.tokens, depth, MAX_MATCHES)
            tree.add_trie(found, stats.calibration, "context", matched)
        if "corpus" in sources and depth > 0:
            matched, found = corpus.continuations(self.history.tokens, depth, MAX_MATCHES, min_n=2)
            # a caller's corpus may hold ids this model has no embedding for: cut a draft before them
            found = [c[:next((i for i, t in enumerate(c) if not 0 <= t < vocab), len(c))] for c in found]
            tree.add_trie([c for c in found if c], stats.calibration, "corpus", matched)
        if "head" in sources and depth > 0:
            for chain, chances in self.head:
                tree.add_scored(chain[:depth], chances[:depth], stats.calibration, "head")
        return tree


class RowsFailed(Exception):
    """Some rows of a :class:`Decoder` call failed; every other row went on (joined the batch, or took its step).

    ``errors`` maps each failed row's handle to its own error: ``ValueError`` (``NotImplementedError`` past a
    sliding window) for a row :meth:`Decoder.add` refused, ``FloatingPointError`` for NaN in the row, or what a
    forward raised (e.g. ``torch.OutOfMemoryError``). The failed rows are out of the batch: nothing more comes
    from them, and :meth:`Decoder.remove` is not needed.
    """

    def __init__(self, errors: dict[int, Exception]):
        super().__init__("; ".join(f"row {handle}: {error}" for handle, error in errors.items()))
        self.errors = errors


class Decoder:
    """A running batch decoded together: rows join with :meth:`add` and leave once done, between steps.

    A step is :meth:`emit` (the tokens made final since the last forward; no forward) then :meth:`decode`
    (one forward over every row), apart so that a caller hands tokens on before the next forward runs: a
    row's first token right after its prefill, a stop string found before a forward is spent on its row.
    ``generate`` is one ``add`` of the whole batch, then steps until no row is left; a server adds
    requests as they arrive (continuous batching). Use it as a context manager: inside, the model's
    attention runs over this decoder's cache (:func:`cllm_rt.runtime.attention.jacobi_attention`) and its linear
    layers take the ops' kernel where it pays (:func:`cllm_rt.runtime.linears.routed_linears`).
    ``eos``: token ids that end a row. Other options as in :func:`generate`.

    One row's fault costs that row only: :meth:`add` and :meth:`decode` raise :class:`RowsFailed` naming
    the rows that failed, with their errors, after the others have joined or stepped; the batch goes on
    with them (catch it, fail those requests, keep stepping).
    """

    def __init__(self, model, *, block_size: int = 16, drafts="auto", max_tree_nodes: int = 64,
                 corpus: Corpus | None = None, eos=(), seed: int = 0):
        self.sources = _check_drafts(drafts)
        self.plain = drafts is None
        self.head = None if self.plain or "head" not in self.sources else attached(model)
        if self.head is not None and type(model.get_output_embeddings()) is Int8Linear:
            raise ValueError("a draft head reads the float LM head, and this model's is int8 "
                             "(cllm_rt.quantize.quantize_int8(..., lm_head=True)): quantize the layers only")
        if self.head is None and "head" in self.sources:
            if drafts != "auto":
                raise ValueError("drafts names 'head' but the model has no draft head attached "
                                 "(cllm_rt.models.load_model attaches one saved beside the model)")
            self.sources = tuple(s for s in self.sources if s != "head")
        for name, value in (("block_size", block_size), ("max_tree_nodes", max_tree_nodes)):
            _check_count(name, value)
        if not self.plain and ops.MAX_TREE_NODES is not None and max_tree_nodes > ops.MAX_TREE_NODES:
            raise ValueError(f"max_tree_nodes must be at most {ops.MAX_TREE_NODES} (the tree kernels' limit)")
        check_model(model)
        self.model, self.block_size, self.max_tree_nodes, self.seed = model, block_size, max_tree_nodes, seed
        learned = learned_for(model)
        self.corpus = learned.corpus if corpus is None else corpus
        self.eos = set(eos)
        self.widest = block_size if self.plain else max_tree_nodes
        self.cost, self.acceptance = learned.cost, learned.acceptance
        self.vocab = model.get_input_embeddings().num_embeddings
        self.stats = GenerationStats(accepted_histogram=[0] * (self.widest + 1))
        self.rows: list[_Row] = []
        self.cache: JacobiCache | None = None
        self.device = model.get_output_embeddings().weight.device
        self._attention = None

    def __enter__(self) -> "Decoder":
        self._attention = contextlib.ExitStack()  # the model's forward routed to the ops while decoding
        self._attention.enter_context(jacobi_attention(self.model))
        self._attention.enter_context(routed_linears(self.model))
        return self

    def __exit__(self, *exc) -> None:
        self._attention.__exit__(*exc)
        self._attention = None

    def add(self, prompts: list[list[int]], max_new_tokens: list[int], handles: list[int],
            sampling: list[SamplingParams | None] | None = None, corpora: list[Corpus] | None = None) -> None:
        """Prefill ``prompts`` (token lists) in one forward; their first tokens come out of the next emit.
        ``sampling``: per prompt, its seeded sampling (None: greedy; default: every row greedy). ``corpora``:
        per prompt, the corpus its "corpus" drafts come from and its answer is added to (default: the
        Decoder's; a server keeps one per tenant, so that no tenant's text drafts, or is timed by, another's).

        Each row is judged on its own: its ids, its budget, and its own prompt plus its own
        ``max_new_tokens`` against the model's positions. A row that fails a check, gives NaN, or fails its
        prefill is refused (a group forward that raises, e.g. out of memory, is retried row by row, so only
        a row that fails alone is refused); the others join, then :class:`RowsFailed` names the refused ones.
        """
        self._check_entered()
        sampling = [None] * len(prompts) if sampling is None else list(sampling)
        corpora = [self.corpus] * len(prompts) if corpora is None else list(corpora)
        errors = {}
        for p, budget, handle in zip(prompts, max_new_tokens, handles, strict=True):
            try:
                self._check_row(p, budget)
            except (ValueError, NotImplementedError) as error:
                errors[handle] = error
        joining = [(p, budget, handle, params, corpus) for p, budget, handle, params, corpus
                   in zip(prompts, max_new_tokens, handles, sampling, corpora, strict=True) if handle not in errors]
        if joining:
            errors.update(self._prefill(joining))
        if errors:
            raise RowsFailed(errors)

    def _check_row(self, prompt: list[int], max_new_tokens: int) -> None:
        _check_count("max_new_tokens", max_new_tokens)
        if not prompt:  # the one check of the ids: torch would raise an IndexError from deep in the model
            raise ValueError("a prompt must be a non-empty list of token ids")
        if min(prompt) < 0 or max(prompt) >= self.vocab:
            raise ValueError(f"prompts must be token ids in [0, {self.vocab}) for this model, got values in "
                             f"[{min(prompt)}, {max(prompt)}]")
        check_positions(self.model, len(prompt), max_new_tokens)

    def _prefill(self, joining: list[tuple[list[int], int, int, SamplingParams | None, Corpus]]
                 ) -> dict[int, Exception]:
        """Prefill ``(prompt, budget, handle, sampling, corpus)`` rows in one forward and join them; return the
        failed ones."""
        prompts = [p for p, *_ in joining]
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=self.device)
        for row, p in enumerate(prompts):
            tokens[row, :len(p)] = torch.tensor(p, device=self.device)
        cache = JacobiCache(self.model.config.num_hidden_layers, torch.zeros_like(lengths),
                            max_len=tokens.shape[1] + max(budget for _, budget, *_ in joining) + self.widest)
        start = time.perf_counter()
        try:
            first, nan = prefill(self.model, cache, tokens, lengths,
                                 batch_sampling([params for _, _, _, params, _ in joining], self.device))
        except Exception as error:  # noqa: BLE001  charged to the row that fails alone, never to the group
            if len(joining) == 1:
                return {joining[0][2]: error}
            del cache, tokens  # the group's buffers go before the rows retry (an out-of-memory error needs it)
            return {handle: e for row in joining for handle, e in self._prefill([row]).items()}
        self.stats.prefill_seconds += time.perf_counter() - start
        errors = {joining[i][2]: nan_error([joining[i][2]]) for i in nan}
        good = [i for i in range(len(joining)) if i not in nan]
        if not good:
            return errors
        if nan:
            cache.select_rows(torch.tensor(good, device=self.device), good)
        self.cache = cache if self.cache is None else self.cache.extend(cache)
        first = first.tolist()
        for i in good:
            p, budget, handle, params, corpus = joining[i]
            row = _Row(handle, p, budget, PromptGuesses(p, f"{self.seed}:{handle}"), NgramIndex(), pending=[first[i]],
                       sampling=params, corpus=corpus)
            row.history.extend(p)
            self.rows.append(row)
        return errors

    def emit(self) -> list[tuple[int, list[int], bool]]:
        """Every row's tokens made final since the last forward (or its prefill); retire finished rows.

        Returns ``(handle, new tokens, finished)`` per row that was active; a finished row's output is cut at
        EOS or its budget and added to the draft corpus.
        """
        self._check_entered()
        events, keep = [], []
        for i, row in enumerate(self.rows):
            before = len(row.output)
            done = _emit(row.output, row.pending, row.max_new_tokens, self.eos)
            row.pending = []  # each token is emitted once, however often emit is called between forwards
            row.history.extend(row.output[before:])
            events.append((row.index, row.output[before:], done))
            if done:
                row.corpus.add(row.prompt + row.output)
            else:
                keep.append(i)
        if len(keep) < len(self.rows):
            self._keep(keep)
        return events

    def decode(self) -> None:
        """Verify one draft tree per row in one forward (nothing without rows); emit hands on what it made final.

        A row whose forward gives NaN leaves the batch; the others keep their step. A forward that raises
        (e.g. out of memory) changes no row; the row with the longest context, the likeliest cause, leaves
        the batch with that error, and the others take their step at the next call. Either way
        :class:`RowsFailed` names the rows that left.
        """
        self._check_entered()
        if not self.rows:
            return
        start, stats = time.perf_counter(), self.stats
        if self.plain:  # one width for the batch: the blocks stay chains, no tree bookkeeping
            budget = min(self.block_size, max(row.depth_left + 1 for row in self.rows))
            trees = [row.jacobi_block(budget) for row in self.rows]
        else:
            trees = [row.tree(self.sources, self.block_size, self.acceptance, row.corpus, self.vocab)
                     for row in self.rows]
            budget = choose_budget(self.cost, [sorted(t.scores[1:], reverse=True) for t in trees],
                                   self.max_tree_nodes,
                                   explore=stats.forward_passes % EXPLORE_EVERY == EXPLORE_EVERY - 1)
            trees = [t.best(budget) for t in trees]
        try:
            greedy, paths, nan, guesses = _verify(self.model, self.cache, trees, self.rows, self.head)
        except Exception as error:  # noqa: BLE001  nothing was committed: shed one row, the rest retry
            longest = max(range(len(self.rows)), key=lambda i: self.cache.lengths_host[i])
            handle = self.rows[longest].index
            self._keep([i for i in range(len(self.rows)) if i != longest])
            raise RowsFailed({handle: error}) from error
        for row, tree, path, predicted, bad, guessed in zip(self.rows, trees, paths, greedy, nan, guesses):
            if bad:
                continue
            row.pending = [predicted[node] for node in path]
            row.jacobi = [predicted[node] for node in tree.first_child_chain(path[-1])]
            row.head = guessed
            row.steps += 1
            if not self.plain:
                self.acceptance.observe(tree, path)
            stats.accepted_histogram[len(path)] += 1
            for node in range(1, len(tree)):
                stats.proposed_by_source[tree.sources[node]] += 1
                stats.accepted_by_source[tree.sources[node]] += node in path
        stats.forward_passes += 1
        stats.budgets[budget] = stats.budgets.get(budget, 0) + 1
        self.cost.observe(len(self.rows) * max(map(len, trees)), time.perf_counter() - start)
        if any(nan):
            failed = {row.index: nan_error([row.index]) for row, bad in zip(self.rows, nan) if bad}
            self._keep([i for i, bad in enumerate(nan) if not bad])
            raise RowsFailed(failed)

    def remove(self, handle: int) -> None:
        """Drop a row before it finishes (e.g. its client went away)."""
        keep = [i for i, row in enumerate(self.rows) if row.index != handle]
        if len(keep) < len(self.rows):
            self._keep(keep)

    def _check_entered(self) -> None:
        if self._attention is None:
            raise RuntimeError("use the Decoder as a context manager: `with Decoder(model) as decoder: ...`")

    def _keep(self, keep: list[int]) -> None:
        if keep:
            self.cache.select_rows(torch.tensor(keep, device=self.device), keep)
        else:
            self.cache = None  # the next add starts a fresh cache
        self.rows = [self.rows[i] for i in keep]


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, max_new_tokens: int,
             block_size: int = 16, drafts="auto", max_tree_nodes: int = 64, corpus: Corpus | None = None,
             eos_token_id=NOT_GIVEN, pad_token_id=NOT_GIVEN, generation_config=None, streamer=None,
             seed: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None) -> GenerationOutput:
    """Greedy generation, many tokens per forward; ``sequences`` equals ``model.generate(..., do_sample=False)``.

    ``drafts``: ``"auto"`` (every source in :data:`cllm_rt.runtime.drafts.SOURCES`, budget chosen per step),
    a tuple of source names, or ``None`` for plain Jacobi decoding with a fixed block of ``block_size``
    (``block_size=1``: plain AR). With drafts, ``block_size`` caps the Jacobi branch and ``max_tree_nodes``
    the nodes per row per step. ``corpus``: the "corpus" source's index (default: this model's earlier
    outputs in this process; each call adds its prompts and outputs to it). Batches are left-padded as for
    ``model.generate``; each row finishes on its own (EOS or ``max_new_tokens``) and leaves the batch.
    ``eos_token_id``/``pad_token_id`` not given fall back on ``generation_config`` (default: the model's);
    given as ``None`` they are off, as in ``model.generate``.

    ``do_sample=True`` (or the generation config's ``do_sample``) samples with ``temperature``, ``top_k``,
    ``top_p``, ``min_p`` (not given: the generation config's, then transformers' defaults) by seeded
    Gumbel-max (:mod:`cllm_rt.runtime.sampling`): row b uses ``seed + b``, and ``seed=None`` draws a seed,
    returned as ``output.seed``. The tokens equal one-token-at-a-time sampling with the same seed on every
    decoding path and in any batch; ``model.generate(do_sample=True)`` draws other random numbers (same
    distribution, another sequence). ``seed`` also seeds the Jacobi guesses, which never change the output.
    """
    _check_count("max_new_tokens", max_new_tokens)
    check_model(model)
    config = model.generation_config if generation_config is None else generation_config
    params = sampling_from_config(config, do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                  min_p=min_p, seed=seed)
    eos, pad_token_id = resolve_special_tokens(model, eos_token_id, pad_token_id, generation_config,
                                               sampling_decided=True)
    tokens, lengths = unpad_prompts(input_ids, attention_mask)
    if streamer is not None and tokens.shape[0] != 1:
        raise ValueError("streaming supports batch size 1 (as transformers' streamers do)")
    prompts = [row[:n].tolist() for row, n in zip(tokens, lengths.tolist())]

    start = time.perf_counter()
    outputs: list[list[int]] = [[] for _ in prompts]
    with Decoder(model, block_size=block_size, drafts=drafts, max_tree_nodes=max_tree_nodes, corpus=corpus,
                 eos=eos, seed=0 if params is None else params.seed) as decoder:
        rows = [None if params is None else replace(params, seed=params.seed + b) for b in range(len(prompts))]
        try:  # one row's fault is the whole call's: the first failed row's own error is raised
            decoder.add(prompts, [max_new_tokens] * len(prompts), list(range(len(prompts))), rows)  # ids first
            if streamer is not None:
                streamer.put(input_ids.cpu())
            while decoder.rows:
                for handle, new, _ in decoder.emit():
                    outputs[handle] += new
                    if streamer is not None:
                        streamer.put(torch.tensor(new))
                decoder.decode()
        except RowsFailed as failed:
            raise next(iter(failed.errors.values())) from None
    if streamer is not None:
        streamer.end()
    stats = decoder.stats
    stats.new_tokens = [len(out) for out in outputs]
    stats.wall_seconds = time.perf_counter() - start
    return GenerationOutput(_assemble(input_ids.to(decoder.device), outputs, pad_token_id), stats,
                            None if params is None else params.seed)


def _check_count(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_drafts(drafts) -> tuple[str, ...]:
    """The draft sources ``drafts`` names (None: plain Jacobi decoding, which drafts only the Jacobi block)."""
    if drafts is None:
        return ("jacobi",)
    if drafts == "auto":
        return SOURCES
    names = (drafts,) if isinstance(drafts, str) else tuple(drafts)
    unknown = [d for d in names if d not in SOURCES]
    if unknown or not names:
        raise ValueError(f"drafts must be 'auto', None or some of {list(SOURCES)}, got {drafts!r}")
    return tuple(s for s in SOURCES if s in names)


def _verify(model, cache: JacobiCache, trees: list[DraftTree], rows: list[_Row], draft_head=None):
    """Run the trees in one forward, commit each row's accepted path; return greedy tokens, paths, NaN flags
    (a row flagged NaN holds garbage) and the draft head's chains past each row's next root (host, as
    ``(tokens, probabilities)`` pairs; empty lists without a head)."""
    width = max(map(len, trees))
    device = cache.lengths.device
    # ragged rows: padding nodes are roots of their own (parent -1) whose outputs are ignored
    pad = [[-1] * (width - len(t)) for t in trees]
    tokens = torch.tensor([t.tokens + [0] * len(p) for t, p in zip(trees, pad)], device=device)
    depths = torch.tensor([t.depths + [0] * len(p) for t, p in zip(trees, pad)], device=device)
    parents = torch.tensor([t.parents + p for t, p in zip(trees, pad)], device=device)
    chains = all(t.parents == list(range(-1, width - 1)) for t in trees)
    sampling = batch_sampling([row.sampling for row in rows], device)
    greedy, accepted, path, nan, guesses = tree_step(model, cache, tokens, depths, parents, chains, sampling,
                                                     draft_head)
    host = torch.cat([nan[:, None], accepted[:, None], greedy, path], 1).tolist()  # the step's one host sync
    paths = [h[2 + width:2 + width + h[1]] for h in host]
    cache.commit_paths(paths, accepted)
    # the head's guesses were computed before the sync above returned: these copies wait for nothing
    heads = ([[] for _ in host] if guesses is None else
             [list(zip(t, c)) for t, c in zip(guesses[0].tolist(), guesses[1].tolist())])
    return [h[2:2 + width] for h in host], paths, [bool(h[0]) for h in host], heads


def _emit(out: list[int], new: list[int], max_new_tokens: int, eos: set[int]) -> bool:
    """Append newly final tokens to a row, cut at EOS or the budget; True once the row is done."""
    for token in new[:max_new_tokens - len(out)]:
        out.append(token)
        if token in eos:
            return True
    return len(out) >= max_new_tokens


def _assemble(input_ids: torch.Tensor, outputs: list[list[int]], pad_token_id: int | None) -> torch.Tensor:
    """The prompts as given, then each row's new tokens padded to the longest row (as model.generate does)."""
    width = max(len(out) for out in outputs)
    if pad_token_id is None and any(len(out) < width for out in outputs):
        raise RuntimeError("rows ended at different lengths but no pad_token_id is set")
    new = torch.full((len(outputs), width), -1 if pad_token_id is None else pad_token_id, dtype=torch.long)
    for row, out in enumerate(outputs):
        new[row, :len(out)] = torch.tensor(out, dtype=torch.long)
    return torch.cat([input_ids.long(), new.to(input_ids.device)], 1)


@dataclass
class _Learned:
    """What decoding learns about one model across calls: step costs, draft calibration, and the corpus of
    its earlier outputs (the "corpus" source's default)."""

    cost: StepCost = field(default_factory=StepCost)
    acceptance: AcceptanceStats = field(default_factory=AcceptanceStats)
    corpus: Corpus = field(default_factory=Corpus)


# Per model object, forgotten with it: another model's outputs would be drafts in another vocabulary.
_LEARNED: "weakref.WeakKeyDictionary[torch.nn.Module, _Learned]" = weakref.WeakKeyDictionary()
_LEARNED_LOCK = threading.Lock()


def learned_for(model) -> _Learned:
    with _LEARNED_LOCK:
        if model not in _LEARNED:
            _LEARNED[model] = _Learned()
        return _LEARNED[model]
