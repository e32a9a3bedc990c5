"""Jacobi trajectory collection, the data of consistency training (CLLMs, Kou et al. 2024, Sec. 3.1).

For each prompt the target model's greedy answer is decoded block after block, as in the paper's data
preparation: a block of n tokens ``y^(0)`` starts from a random guess, Jacobi iterations
``y^(j+1)_i = argmax p(. | context, y^(j)_{<i})`` run until the fixed point ``y*`` (no position changes
any more), every state ``y^(0) … y^(K) = y*`` is recorded, and the fixed point joins the context of the next
block — until EOS or ``max_new_tokens``. Greedy decoding makes the fixed point unique: the concatenated fixed
points are exactly the model's greedy autoregressive answer.

Conventions (shared with :mod:`cllm_rt.runtime.decoding`):
  * The answer's first token ``a_0`` comes from the prefill. Block k covers answer tokens
    ``a_{1+kn} … a_{(k+1)n}``; its context is ``prompt + a_0 … a_{kn}``. Feeding
    ``[a_{kn}, y_1 … y_{n-1}]`` after the cached context yields the next state in one forward, and a block
    has converged once ``y_1 … y_{n-1}`` are unchanged by it (``accepted == n``): the forward's output is then
    the fixed point, its keys/values are already in the cache and are committed with ``cache.commit(n)``.
    The context is never recomputed: one forward per Jacobi iteration, several prompts per batch, each
    row with its own cache length and its own block schedule.
  * Shrinking window: the leading positions an iteration proves final (``accepted``: they can no longer
    change) are committed to the cache at once, and the next iteration feeds only the rest of the block,
    ``[y_f, y_{f+1} … y_{n-1}]`` after f committed positions. Its outputs are those the whole block would
    give (each position sees the same final prefix, now read from the cache), so the recorded states are
    unchanged while each iteration feeds n - f tokens instead of n; a row whose window is narrower than the
    batch's is padded after its window, where causal attention keeps the padding out of every real position.
    (The padding's positions may pass the row's last one by up to n - 1; a RoPE that rescales by the largest
    position in the batch — dynamic NTK, longrope — sees them, the caveat ragged rows already carry.)
    Measured on SmolLM2-135M (float32, 1 thread, 4 GSM8K prompts, n = 16, 128 new tokens): 0.80 of the
    tokens fed, 0.83x the time.
  * Guesses: n tokens drawn uniformly from the prompt (the paper's choice) by a generator seeded with
    ``(seed, prompt index)`` only, so a prompt's trajectories do not depend on batch size, process count
    or on where an interrupted run resumed.
  * A block always has n positions; ``valid`` counts those up to and including the first EOS of the fixed
    point (the rest are "past EOS"). The stored answer is cut at that EOS and at ``max_new_tokens``.

Storage and resume: :mod:`cllm_rt.training.storage`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..runtime.attention import jacobi_attention
from ..runtime.cache import JacobiCache
from ..runtime.inputs import NOT_GIVEN, check_model, check_positions, raise_on_nan, resolve_special_tokens
from ..runtime.linears import routed_linears
from ..runtime.step import PromptGuesses, jacobi_step, prefill
from . import storage
from .distributed import Processes, torchrun_processes
from .storage import BlockTrajectory, PromptTrajectories


def prompt_seed(seed: int, prompt_index: int) -> int:
    """The guess seed of one prompt: independent of batching, ranks and resumption."""
    return seed * 1_000_003 + prompt_index


class TrajectoryBuilder:
    """One prompt's blocks, state after state; the caller supplies the greedy tokens of each iteration.

    The KV-cached collector and the recompute-everything baseline (benchmarks/bench_collect.py) differ only
    in how they compute ``greedy``; everything the paper's algorithm decides lives here.
    """

    def __init__(self, prompt: list[int], seed: int, block_size: int, max_new_tokens: int, eos: set[int]):
        self.guesses = PromptGuesses(prompt, seed)
        self.block_size, self.max_new_tokens, self.eos = block_size, max_new_tokens, eos
        self.answer: list[int] = []
        self.blocks: list[BlockTrajectory] = []
        self.states: list[list[int]] = []
        self.final = 0  # leading positions of states[-1] proven final (the shrinking window's committed part)
        self.finished = False

    def start(self, first_token: int) -> None:
        """Take the prefill's greedy token and open the first block (unless it already ends the answer)."""
        self.answer.append(first_token)
        self.finished = first_token in self.eos or self.max_new_tokens <= 1
        if not self.finished:
            self._open_block()

    @property
    def block_input(self) -> list[int]:
        """What one Jacobi iteration feeds after the cached context (the ``final`` committed positions
        included): the last final token, then y_{final+1} … y_{n-1}."""
        last_final = self.states[-1][self.final - 1] if self.final else self.answer[-1]
        return [last_final] + self.states[-1][self.final:-1]

    def advance(self, greedy: list[int]) -> bool:
        """Record the iteration's output ``greedy`` (n tokens); True when it is the block's fixed point.

        ``greedy[i]`` depends on ``y_1 … y_i`` only, so once those are unchanged (``greedy[:-1] == y[:-1]``)
        the whole output is final, even if it changed the last position.
        """
        current = self.states[-1]
        if greedy != current:
            self.states.append(greedy)
        if greedy[:-1] != current[:-1]:
            # greedy[i] is final once y_1 … y_i are: greedy[0] always, then as long as each input was reproduced
            self.final = 1 + next(i for i, (a, b) in enumerate(zip(greedy, current)) if a != b)
            return False
        eos_at = next((i for i, token in enumerate(greedy) if token in self.eos), None)
        valid = self.block_size if eos_at is None else eos_at + 1
        self.blocks.append(BlockTrajectory(len(self.blocks), self.states, valid))
        self.answer += greedy[:valid]
        del self.answer[self.max_new_tokens:]
        self.finished = eos_at is not None or len(self.answer) >= self.max_new_tokens
        if not self.finished:
            self._open_block()
        return True

    def _open_block(self) -> None:
        self.states = [self.guesses.draw(self.block_size)]
        self.final = 0


def blocks_needed(block_size: int, max_new_tokens: int) -> int:
    """Blocks after the prefill's token that reach ``max_new_tokens`` (the last one may overshoot)."""
    return -(-(max_new_tokens - 1) // block_size)


@torch.inference_mode()
def decode_trajectories(model, prompts: list[list[int]], seeds: list[int], *, block_size: int,
                        max_new_tokens: int, eos: set[int]) -> list[TrajectoryBuilder]:
    """Collect the Jacobi trajectories of a batch of prompts with one KV cache (rows are ragged)."""
    device = model.get_output_embeddings().weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.zeros(len(prompts), max(len(p) for p in prompts), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(prompt, device=device)
    decoded = blocks_needed(block_size, max_new_tokens) * block_size
    check_positions(model, tokens.shape[1], 1 + decoded)
    # a padded window may reach up to n - 1 positions past a row's block
    cache = JacobiCache(model.config.num_hidden_layers, torch.zeros_like(lengths),
                        max_len=tokens.shape[1] + decoded + block_size)
    builders = [TrajectoryBuilder(p, seed, block_size, max_new_tokens, eos) for p, seed in zip(prompts, seeds)]

    with jacobi_attention(model), routed_linears(model):
        first, nan = prefill(model, cache, tokens, lengths)
        raise_on_nan(nan)
        for builder, token in zip(builders, first.tolist()):
            builder.start(token)
        active = list(range(len(builders)))  # cache row i decodes builders[active[i]]
        while True:
            keep = [i for i, b in enumerate(active) if not builders[b].finished]
            if not keep:
                break
            if len(keep) < len(active):
                cache.select_rows(torch.tensor(keep, device=device), keep)
                active = [active[i] for i in keep]
            windows = [builders[b].block_input for b in active]
            width = max(map(len, windows))
            block = torch.tensor([w + [w[-1]] * (width - len(w)) for w in windows], device=device)  # [B, width]
            greedy, _, nan = jacobi_step(model, cache, block)
            host = torch.cat([nan[:, None].long(), greedy], 1).tolist()  # the iteration's one host sync
            raise_on_nan([active[i] for i, h in enumerate(host) if h[0]])
            committed = []
            for b, window, h in zip(active, windows, host):
                builder = builders[b]
                before = builder.final
                # the outputs before the window are the final ones already recorded
                converged = builder.advance(builder.states[-1][:before] + h[1:1 + len(window)])
                # a converged row keeps its whole window (the fixed point's context); the others its final prefix
                committed.append(len(window) if converged else builder.final - before)
            cache.commit(torch.tensor(committed, device=device), committed)
    return builders


def is_repetitive(tokens: list[int], max_period: int = 16, min_coverage: float = 0.5) -> bool:
    """True when one stretch repeating a unit of at most ``max_period`` tokens (4+ times) covers at least
    ``min_coverage`` of the answer: the degenerate loops that teach consistency training nothing but the loop.
    """
    for period in range(1, max_period + 1):
        run = 0  # consecutive positions equal to the token one period earlier
        for i in range(period, len(tokens)):
            run = run + 1 if tokens[i] == tokens[i - period] else 0
            if run >= 3 * period and run + period >= min_coverage * len(tokens):
                return True
    return False


# ---------------------------------------------------------------- collection with storage and resume

@dataclass(frozen=True)
class CollectSettings:
    block_size: int
    max_new_tokens: int
    seed: int = 0
    prompt_template: str | None = None  # recorded in the manifest; applied by read_prompt_file
    drop_repetitive: bool = True  # loops teach consistency training only the loop; the manifest counts them
    keep_reference: bool = False
    shard_size: int = 64
    skip_long_prompts: bool = False  # leave out prompts with no room for max_new_tokens instead of refusing


@dataclass
class Prompt:
    tokens: list[int]
    reference: list[int] | None = None


def collect(model, prompts: list[Prompt], out_dir: str, settings: CollectSettings, *, batch_size: int = 8,
            eos_token_id=NOT_GIVEN, tokenizer=None, processes: Processes | None = None,
            progress: bool = True) -> dict:
    """Collect the trajectories of ``prompts`` into ``out_dir`` (resuming a run there); return the manifest.

    ``eos_token_id`` not given falls back on the model's generation config, ``None`` means no EOS, as in
    ``model.generate``. Every prompt's length is checked before anything is written; ``tokenizer``
    (optional) is fingerprinted into the manifest; ``processes`` comes from
    :func:`cllm_rt.training.distributed.torchrun_processes` (default: a single process).
    """
    _check_settings(settings, batch_size, prompts)
    check_model(model)
    processes = processes or Processes(0, 1, model.get_output_embeddings().weight.device)
    eos, _ = resolve_special_tokens(model, eos_token_id, None)
    too_long = _too_long_prompts(model, prompts, settings)
    identity = {"format": storage.FORMAT, "settings": {**dataclasses.asdict(settings), "eos_token_ids": eos},
                "model": storage.model_fingerprint(model),
                "tokenizer": None if tokenizer is None else storage.tokenizer_fingerprint(tokenizer),
                "prompts": storage.prompts_fingerprint(prompts)}
    identity["identity"] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    storage.check_resumable(out_dir, identity)  # every rank checks, so a mismatch fails everywhere, not in a barrier
    if processes.is_main:
        os.makedirs(out_dir, exist_ok=True)
        if not os.path.exists(os.path.join(out_dir, storage.MANIFEST)):
            storage.write_manifest(out_dir, identity)
    processes.barrier()

    shard_size = settings.shard_size
    num_shards = -(-len(prompts) // shard_size)
    mine = list(range(processes.rank, num_shards, processes.world_size))
    done = storage.finished_shards(out_dir, identity["identity"])

    def shard_prompts(shard: int) -> range:
        return range(shard * shard_size, min((shard + 1) * shard_size, len(prompts)))

    bar = tqdm(total=sum(len(shard_prompts(s)) for s in mine), initial=sum(len(shard_prompts(s)) for s in mine
               if s in done), unit="prompt", desc="collect", disable=not (progress and processes.is_main))
    tokens, dropped, start = 0, 0, time.perf_counter()
    for shard in (s for s in mine if s not in done):
        collected, repetitive = [], 0
        indices = list(shard_prompts(shard))
        for first in range(0, len(indices), batch_size):
            batch = [i for i in indices[first:first + batch_size] if i not in too_long]
            bar.update(len(indices[first:first + batch_size]) - len(batch))
            if not batch:
                continue
            builders = decode_trajectories(
                model, [prompts[i].tokens for i in batch], [prompt_seed(settings.seed, i) for i in batch],
                block_size=settings.block_size, max_new_tokens=settings.max_new_tokens, eos=set(eos))
            for i, builder in zip(batch, builders):
                tokens += len(builder.answer)
                if settings.drop_repetitive and is_repetitive(builder.answer):
                    repetitive += 1
                else:
                    collected.append(PromptTrajectories(i, prompts[i].tokens, builder.answer, builder.blocks,
                                                        prompts[i].reference if settings.keep_reference else None))
            bar.update(len(batch))
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):.1f} tok/s, "
                                f"{dropped + repetitive} repetitive dropped")
        dropped += repetitive
        storage.write_shard(out_dir, shard, indices[0], len(indices), collected, identity["identity"], repetitive)
        if processes.is_main:
            storage.write_manifest(out_dir, identity)
    bar.close()
    processes.barrier()
    if processes.is_main:
        storage.write_manifest(out_dir, identity, num_shards)
    processes.barrier()
    return storage.read_manifest(out_dir)


def _too_long_prompts(model, prompts: list[Prompt], settings: CollectSettings) -> set[int]:
    """Prompts with no room for the answer within the model's positions: refused up front (naming the user's
    numbers) unless ``skip_long_prompts``, in which case they are left out like dropped answers."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None:
        return set()
    # blocks are decoded whole, so the last one may run past max_new_tokens
    needed = 1 + blocks_needed(settings.block_size, settings.max_new_tokens) * settings.block_size
    too_long = {i for i, p in enumerate(prompts) if len(p.tokens) + needed > limit}
    if too_long and not settings.skip_long_prompts:
        first = min(too_long)
        raise ValueError(f"{len(too_long)} of {len(prompts)} prompts are too long for max_new_tokens="
                         f"{settings.max_new_tokens}: e.g. prompt {first} has {len(prompts[first].tokens)} tokens, "
                         f"and decoding {settings.max_new_tokens} tokens in blocks of {settings.block_size} needs "
                         f"{needed} more positions, beyond max_position_embeddings={limit}; shorten them, lower "
                         "max_new_tokens, or skip them (--skip-long-prompts)")
    return too_long


def _check_settings(settings: CollectSettings, batch_size: int, prompts: list[Prompt]) -> None:
    for name, value, least in (("block_size", settings.block_size, 2), ("max_new_tokens", settings.max_new_tokens, 1),
                               ("shard_size", settings.shard_size, 1), ("batch_size", batch_size, 1)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if not prompts:
        raise ValueError("no prompts to collect trajectories for")
    empty = [i for i, p in enumerate(prompts) if not p.tokens]
    if empty:
        raise ValueError(f"prompts {empty[:10]} are empty (no tokens)")
    if settings.keep_reference:
        missing = [i for i, p in enumerate(prompts) if p.reference is None]
        if missing:
            raise ValueError(f"keep_reference is set but prompts {missing[:10]} have no reference answer")
