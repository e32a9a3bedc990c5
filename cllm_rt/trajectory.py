"""Jacobi trajectory collection, the data of consistency training (CLLMs, Kou et al. 2024, Sec. 3.1).

For each prompt the target model's greedy answer is decoded block after block, as in the paper's data
preparation: a block of n tokens ``y^(0)`` starts from a random guess, Jacobi iterations
``y^(j+1)_i = argmax p(. | context, y^(j)_{<i})`` run until the fixed point ``y*`` (no position changes
any more), every state ``y^(0) … y^(K) = y*`` is recorded, and the fixed point joins the context of the next
block — until EOS or ``max_new_tokens``. Greedy decoding makes the fixed point unique: the concatenated fixed
points are exactly the model's greedy autoregressive answer.

Conventions (shared with :mod:`cllm_rt.decoding`):
  * The answer's first token ``a_0`` comes from the prefill. Block k covers answer tokens
    ``a_{1+kn} … a_{(k+1)n}``; its context is ``prompt + a_0 … a_{kn}``. Feeding
    ``[a_{kn}, y_1 … y_{n-1}]`` after the cached context yields the next state in one forward, and a block
    has converged once ``y_1 … y_{n-1}`` are unchanged by it (``accepted == n``): the forward's output is then
    the fixed point, its keys/values are already in the cache and are committed with ``cache.commit(n)``.
    The context is never recomputed: one forward per Jacobi iteration, several prompts per batch, each
    row with its own cache length and its own block schedule.
  * Guesses: n tokens drawn uniformly from the prompt (the paper's choice) by a generator seeded with
    ``(seed, prompt index)`` only, so a prompt's trajectories do not depend on batch size, process count
    or on where an interrupted run resumed.
  * A block always has n positions; ``valid`` counts those up to and including the first EOS of the fixed
    point (the rest are "past EOS"). The stored answer is cut at that EOS and at ``max_new_tokens``.

Storage (``--out`` directory):
  ``manifest.json``  ``format`` ("cllm_rt.trajectories/1"); ``settings`` (block_size, max_new_tokens, seed,
      prompt_template, drop_repetitive, keep_reference, shard_size, eos_token_ids); ``model`` (model_type,
      vocab_size, and a fingerprint: sha256 over every parameter's name, shape, dtype and first values);
      ``tokenizer`` (class, vocab size, sha256 of the vocabulary and special tokens; null without one);
      ``prompts`` (count and sha256 of all prompt/reference token ids: catches another data file or
      tokenization); ``identity`` (sha256 of all the above); progress: ``shards`` (file, first_prompt,
      prompts, kept, blocks), ``prompts_done``, ``prompts_kept``, ``complete``.
  ``shard-SSSSS.safetensors``  prompts ``[S*shard_size, (S+1)*shard_size)`` of the data, flat tensors:
      ``prompt_index`` int64 [P] (data line of each kept prompt); ``prompt_tokens``/``answer_tokens``
      (/``reference_tokens`` with keep_reference) int32 with ``*_offsets`` int64 [P+1];
      ``block_prompt``, ``block_index``, ``block_valid`` int64 [NB]; ``states`` int32 [total states, n] with
      ``state_offsets`` int64 [NB+1] (block b owns states ``state_offsets[b]:state_offsets[b+1]``, the last
      one its fixed point). Metadata: format, the manifest identity, shard index, prompts, kept.

Resume: a shard is finished exactly when its file exists (every write is atomic, :mod:`cllm_rt.atomic_io`),
so rerunning the same command skips finished shards and no prompt is lost or duplicated. A rerun with other
settings, another model, tokenizer or data stops with an error naming what differs. Under torchrun, rank r
collects shards ``r::world_size`` (whole shards, not single prompts, so a resumed run may use another
process count); rank 0 merges every rank's shards into the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
import warnings
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .atomic_io import atomic_write, atomic_write_json
from .attention import jacobi_attention
from .cache import JacobiCache
from .decoding import (PromptGuesses, check_positions, raise_on_nan, check_model, jacobi_step, prefill,
                       resolve_special_tokens)
from .distributed import Processes, torchrun_processes

FORMAT = "cllm_rt.trajectories/1"
MANIFEST = "manifest.json"
_SHARD_NAME = re.compile(r"shard-(\d{5})\.safetensors")


# ---------------------------------------------------------------- trajectories of one prompt

@dataclass
class BlockTrajectory:
    index: int  # block k covers answer tokens a_{1+kn} … a_{(k+1)n}
    states: list[list[int]]  # y^(0) … y^(K), n tokens each; states[-1] is the fixed point
    valid: int  # positions up to and including the fixed point's first EOS (n when it has none)


@dataclass
class PromptTrajectories:
    index: int  # position of the prompt in the data
    prompt: list[int]
    answer: list[int]  # greedy answer: a_0 from the prefill, then the fixed points, cut at EOS / the budget
    blocks: list[BlockTrajectory]
    reference: list[int] | None = None  # the dataset's answer, kept for the AR loss

    def context(self, block: BlockTrajectory) -> list[int]:
        """The tokens before ``block``: the prompt and the answer up to its last final token."""
        return self.prompt + self.answer[:1 + block.index * len(block.states[0])]


def prompt_seed(seed: int, prompt_index: int) -> int:
    """The guess seed of one prompt: independent of batching, ranks and resumption."""
    return seed * 1_000_003 + prompt_index


class TrajectoryBuilder:
    """One prompt's blocks, state after state; the caller supplies the greedy tokens of each iteration.

    The KV-cached collector and the recompute-everything baseline (benchmarks/bench_collect.py) differ only
    in how they compute ``greedy``; everything the paper's algorithm decides lives here.
    """

    def __init__(self, prompt: torch.Tensor, seed: int, block_size: int, max_new_tokens: int, eos: set[int]):
        # prompt: [L] token ids on the model's device
        self.guesses = PromptGuesses(prompt[None], torch.tensor([prompt.numel()], device=prompt.device), seed)
        self.block_size, self.max_new_tokens, self.eos = block_size, max_new_tokens, eos
        self.answer: list[int] = []
        self.blocks: list[BlockTrajectory] = []
        self.states: list[list[int]] = []
        self.finished = False

    def start(self, first_token: int) -> None:
        """Take the prefill's greedy token and open the first block (unless it already ends the answer)."""
        self.answer.append(first_token)
        self.finished = first_token in self.eos or self.max_new_tokens <= 1
        if not self.finished:
            self._open_block()

    @property
    def block_input(self) -> list[int]:
        """What one Jacobi iteration feeds after the cached context: the last final token, then y_1 … y_{n-1}."""
        return [self.answer[-1]] + self.states[-1][:-1]

    def advance(self, greedy: list[int]) -> bool:
        """Record the iteration's output ``greedy`` (n tokens); True when it is the block's fixed point.

        ``greedy[i]`` depends on ``y_1 … y_i`` only, so once those are unchanged (``greedy[:-1] == y[:-1]``)
        the whole output is final, even if it changed the last position.
        """
        current = self.states[-1]
        if greedy != current:
            self.states.append(greedy)
        if greedy[:-1] != current[:-1]:
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
        self.states = [self.guesses.draw(self.block_size)[0].tolist()]


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
    cache = JacobiCache(model.config.num_hidden_layers, torch.zeros_like(lengths), max_len=tokens.shape[1] + decoded)
    builders = [TrajectoryBuilder(tokens[row, :len(p)], seed, block_size, max_new_tokens, eos)
                for row, (p, seed) in enumerate(zip(prompts, seeds))]

    with jacobi_attention(model):
        for builder, first in zip(builders, prefill(model, cache, tokens, lengths).tolist()):
            builder.start(first)
        active = list(range(len(builders)))  # cache row i decodes builders[active[i]]
        while True:
            keep = [i for i, b in enumerate(active) if not builders[b].finished]
            if not keep:
                break
            if len(keep) < len(active):
                cache.select_rows(torch.tensor(keep, device=device), keep)
                active = [active[i] for i in keep]
            block = torch.tensor([builders[b].block_input for b in active], device=device)  # [B, n]
            greedy, _, nan = jacobi_step(model, cache, block)
            host = torch.cat([nan[:, None].long(), greedy], 1).tolist()  # the iteration's one host sync
            raise_on_nan([active[i] for i, h in enumerate(host) if h[0]])
            # a converged row keeps the block it just fed (it is the fixed point's context); the others retry
            committed = [block_size if builders[b].advance(h[1:]) else 0 for b, h in zip(active, host)]
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


# ---------------------------------------------------------------- identities (what a rerun must match)

def model_fingerprint(model) -> dict:
    """Identify a model's weights without reading all of them: every parameter's name, shape, dtype and
    first 64 values (any fine-tune changes those), hashed."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype};".encode())
        digest.update(param.detach().flatten()[:64].to("cpu", torch.float64).numpy().tobytes())
    return {"model_type": model.config.model_type, "vocab_size": model.config.vocab_size,
            "sha256": digest.hexdigest()}


def tokenizer_fingerprint(tokenizer) -> dict:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return {"class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
            "sha256": hashlib.sha256((vocab + special).encode()).hexdigest()}


def _prompts_fingerprint(prompts: list["Prompt"]) -> dict:
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(json.dumps([p.tokens, p.reference]).encode())
    return {"count": len(prompts), "sha256": digest.hexdigest()}


# ---------------------------------------------------------------- collection with storage and resume

@dataclass(frozen=True)
class CollectSettings:
    block_size: int
    max_new_tokens: int
    seed: int = 0
    prompt_template: str | None = None  # recorded in the manifest; applied by read_prompt_file
    drop_repetitive: bool = False
    keep_reference: bool = False
    shard_size: int = 64


@dataclass
class Prompt:
    tokens: list[int]
    reference: list[int] | None = None


def collect(model, prompts: list[Prompt], out_dir: str, settings: CollectSettings, *, batch_size: int = 8,
            eos_token_id=None, tokenizer=None, processes: Processes | None = None, progress: bool = True) -> dict:
    """Collect the trajectories of ``prompts`` into ``out_dir`` (resuming a run there); return the manifest.

    ``eos_token_id`` falls back on the model's generation config as in ``model.generate``; ``tokenizer``
    (optional) is fingerprinted into the manifest; ``processes`` comes from
    :func:`cllm_rt.distributed.torchrun_processes` (default: a single process).
    """
    _check_settings(settings, batch_size, prompts)
    check_model(model)
    processes = processes or Processes(0, 1, model.get_output_embeddings().weight.device)
    eos, _ = resolve_special_tokens(model, eos_token_id, None)
    identity = {"format": FORMAT, "settings": {**dataclasses.asdict(settings), "eos_token_ids": eos},
                "model": model_fingerprint(model),
                "tokenizer": None if tokenizer is None else tokenizer_fingerprint(tokenizer),
                "prompts": _prompts_fingerprint(prompts)}
    identity["identity"] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    _check_resumable(out_dir, identity)  # every rank checks, so a mismatch fails everywhere, not in a barrier
    if processes.is_main:
        os.makedirs(out_dir, exist_ok=True)
        if not os.path.exists(os.path.join(out_dir, MANIFEST)):
            _write_manifest(out_dir, identity)
    processes.barrier()

    shard_size = settings.shard_size
    num_shards = -(-len(prompts) // shard_size)
    mine = list(range(processes.rank, num_shards, processes.world_size))
    done = _finished_shards(out_dir, identity["identity"])

    def shard_prompts(shard: int) -> range:
        return range(shard * shard_size, min((shard + 1) * shard_size, len(prompts)))

    bar = tqdm(total=sum(len(shard_prompts(s)) for s in mine), initial=sum(len(shard_prompts(s)) for s in mine
               if s in done), unit="prompt", desc="collect", disable=not (progress and processes.is_main))
    tokens, start = 0, time.perf_counter()
    for shard in (s for s in mine if s not in done):
        collected = []
        indices = list(shard_prompts(shard))
        for first in range(0, len(indices), batch_size):
            batch = indices[first:first + batch_size]
            builders = decode_trajectories(
                model, [prompts[i].tokens for i in batch], [prompt_seed(settings.seed, i) for i in batch],
                block_size=settings.block_size, max_new_tokens=settings.max_new_tokens, eos=set(eos))
            for i, builder in zip(batch, builders):
                tokens += len(builder.answer)
                if not (settings.drop_repetitive and is_repetitive(builder.answer)):
                    collected.append(PromptTrajectories(i, prompts[i].tokens, builder.answer, builder.blocks,
                                                        prompts[i].reference if settings.keep_reference else None))
            bar.update(len(batch))
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):.1f} tok/s")
        _write_shard(out_dir, shard, indices[0], len(indices), collected, identity["identity"])
        if processes.is_main:
            _write_manifest(out_dir, identity)
    bar.close()
    processes.barrier()
    if processes.is_main:
        _write_manifest(out_dir, identity, num_shards)
    processes.barrier()
    return _read_manifest(out_dir)


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


def _check_resumable(out_dir: str, identity: dict) -> None:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        if os.path.isdir(out_dir) and any(not name.startswith(".") for name in os.listdir(out_dir)):
            raise FileExistsError(f"{out_dir} is not empty and holds no {MANIFEST}: not a trajectory directory "
                                  "of cllm_rt; collect into a new or empty directory")
        return
    previous = _read_manifest(out_dir)
    if previous.get("identity") == identity["identity"]:
        return
    differences = []
    for key in ("format", "settings", "model", "tokenizer", "prompts"):
        old, new = previous.get(key), identity[key]
        if isinstance(old, dict) and isinstance(new, dict):
            differences += [f"{key}.{k}: {old.get(k)!r} there, {new.get(k)!r} now"
                            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif old != new:
            differences.append(f"{key}: {old!r} there, {new!r} now")
    raise ValueError(f"{out_dir} holds trajectories of another collection ({'; '.join(differences)}). "
                     "Rerun with the original model, tokenizer, data and settings to resume, or collect into "
                     "another --out directory.")


def _shard_path(out_dir: str, shard: int) -> str:
    return os.path.join(out_dir, f"shard-{shard:05d}.safetensors")


def _finished_shards(out_dir: str, identity: str) -> dict[int, dict]:
    """Shard index → metadata of every shard file present (each file is complete: they are written atomically)."""
    found = {}
    for name in sorted(os.listdir(out_dir)):
        match = _SHARD_NAME.fullmatch(name)
        if not match:
            continue
        with safe_open(os.path.join(out_dir, name), "pt") as f:
            meta = f.metadata()
        if meta.get("identity") != identity:
            raise ValueError(f"{os.path.join(out_dir, name)} belongs to another collection (identity "
                             f"{meta.get('identity')}, expected {identity}); remove it or use another directory")
        found[int(match.group(1))] = {"file": name, "first_prompt": int(meta["first_prompt"]),
                                      "prompts": int(meta["prompts"]), "kept": int(meta["kept"]),
                                      "blocks": int(meta["blocks"])}
    return found


def _write_manifest(out_dir: str, identity: dict, num_shards: int | None = None) -> None:
    shards = _finished_shards(out_dir, identity["identity"])
    complete = num_shards is not None and len(shards) == num_shards
    atomic_write_json(os.path.join(out_dir, MANIFEST), {
        **identity, "shards": [shards[s] for s in sorted(shards)], "complete": complete,
        "prompts_done": sum(s["prompts"] for s in shards.values()),
        "prompts_kept": sum(s["kept"] for s in shards.values())})


def _read_manifest(out_dir: str) -> dict:
    with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as f:
        return json.load(f)


def _flat(sequences: list[list[int]], name: str) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([0] + [len(s) for s in sequences], dtype=torch.int64)
    return {f"{name}_tokens": torch.tensor([t for s in sequences for t in s], dtype=torch.int32),
            f"{name}_offsets": lengths.cumsum(0)}


def _unflat(tensors: dict[str, torch.Tensor], name: str) -> list[list[int]]:
    tokens, offsets = tensors[f"{name}_tokens"].tolist(), tensors[f"{name}_offsets"].tolist()
    return [tokens[a:b] for a, b in zip(offsets, offsets[1:])]


def _write_shard(out_dir: str, shard: int, first_prompt: int, num_prompts: int,
                 collected: list[PromptTrajectories], identity: str) -> None:
    blocks = [(row, block) for row, p in enumerate(collected) for block in p.blocks]
    block_size = len(blocks[0][1].states[0]) if blocks else 0
    states = [state for _, block in blocks for state in block.states]
    tensors = {
        "prompt_index": torch.tensor([p.index for p in collected], dtype=torch.int64),
        **_flat([p.prompt for p in collected], "prompt"), **_flat([p.answer for p in collected], "answer"),
        "block_prompt": torch.tensor([row for row, _ in blocks], dtype=torch.int64),
        "block_index": torch.tensor([b.index for _, b in blocks], dtype=torch.int64),
        "block_valid": torch.tensor([b.valid for _, b in blocks], dtype=torch.int64),
        "states": torch.tensor(states, dtype=torch.int32).reshape(len(states), block_size),
        "state_offsets": torch.tensor([0] + [len(b.states) for _, b in blocks], dtype=torch.int64).cumsum(0),
    }
    if any(p.reference is not None for p in collected):
        tensors.update(_flat([p.reference for p in collected], "reference"))
    metadata = {"format": FORMAT, "identity": identity, "shard": str(shard), "first_prompt": str(first_prompt),
                "prompts": str(num_prompts), "kept": str(len(collected)), "blocks": str(len(blocks))}
    atomic_write(_shard_path(out_dir, shard), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _read_shard(path: str) -> list[PromptTrajectories]:
    tensors = load_file(path)
    prompts, answers = _unflat(tensors, "prompt"), _unflat(tensors, "answer")
    references = _unflat(tensors, "reference") if "reference_tokens" in tensors else [None] * len(prompts)
    collected = [PromptTrajectories(i, p, a, [], r)
                 for i, p, a, r in zip(tensors["prompt_index"].tolist(), prompts, answers, references)]
    states, offsets = tensors["states"].tolist(), tensors["state_offsets"].tolist()
    for b, (row, index, valid) in enumerate(zip(tensors["block_prompt"].tolist(), tensors["block_index"].tolist(),
                                                tensors["block_valid"].tolist())):
        collected[row].blocks.append(BlockTrajectory(index, states[offsets[b]:offsets[b + 1]], valid))
    return collected


@dataclass
class Trajectories:
    manifest: dict
    prompts: list[PromptTrajectories] = field(default_factory=list)

    @property
    def block_size(self) -> int:
        return self.manifest["settings"]["block_size"]


def load_trajectories(directory: str) -> Trajectories:
    """Read every shard the manifest lists (prompts in data order)."""
    if not os.path.exists(os.path.join(directory, MANIFEST)):
        raise FileNotFoundError(f"{directory} has no {MANIFEST}: not a trajectory directory (create one with "
                                "`cllm-rt collect`)")
    manifest = _read_manifest(directory)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{directory}/{MANIFEST} has format {manifest.get('format')!r}; expected {FORMAT!r}")
    if not manifest["complete"]:
        warnings.warn(f"{directory}: collection incomplete ({manifest['prompts_done']} of "
                      f"{manifest['prompts']['count']} prompts); using the finished shards", stacklevel=2)
    prompts = [p for shard in manifest["shards"] for p in _read_shard(os.path.join(directory, shard["file"]))]
    return Trajectories(manifest, sorted(prompts, key=lambda p: p.index))


# ---------------------------------------------------------------- the command line's data path

@dataclass(frozen=True)
class PromptText:
    prompt: str
    reference: str | None


def read_prompt_file(path: str, prompt_template: str | None = None, keep_reference: bool = False) -> list[PromptText]:
    """Prompts of a JSON-lines file: field ``prompt``, or ``question`` formatted through ``prompt_template``
    (``{question}`` marks its place); ``answer`` is the reference, required with ``keep_reference``."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            if prompt_template is not None:
                if "question" not in row:
                    raise ValueError(f"{path}:{number}: no field 'question' for --prompt-template "
                                     f"(fields: {sorted(row)})")
                prompt = prompt_template.replace("{question}", str(row["question"]))  # other braces stay as written
            elif "prompt" in row:
                prompt = row["prompt"]
            else:
                raise ValueError(f"{path}:{number}: no field 'prompt' (fields: {sorted(row)}); give "
                                 "--prompt-template to format a 'question' field instead")
            if keep_reference and "answer" not in row:
                raise ValueError(f"{path}:{number}: no field 'answer' to keep as the reference (--keep-reference)")
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"{path}:{number}: the prompt must be a non-empty string")
            texts.append(PromptText(prompt, str(row["answer"]) if keep_reference else None))
    if not texts:
        raise ValueError(f"{path} holds no prompts (the file is empty)")
    return texts


def collect_from_files(model_dir: str, data_path: str, out_dir: str, settings: CollectSettings, *,
                       batch_size: int = 8, dtype: str = "auto", progress: bool = True) -> dict:
    """``cllm-rt collect``: read and tokenize the data, load the model on this process's device, collect."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = read_prompt_file(data_path, settings.prompt_template, settings.keep_reference)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos_suffix = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    # the reference ends with EOS, so the AR loss also teaches the model where to stop
    prompts = [Prompt(tokenizer(t.prompt)["input_ids"], None if t.reference is None else
                      tokenizer(t.reference, add_special_tokens=False)["input_ids"] + eos_suffix) for t in texts]
    with torchrun_processes() as processes:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
        model = model.to(processes.device).eval()
        return collect(model, prompts, out_dir, settings, batch_size=batch_size, tokenizer=tokenizer,
                       processes=processes, progress=progress)
