"""Trajectory storage: the on-disk format of collected Jacobi trajectories, identities and resume.

Storage (``--out`` directory):
  ``manifest.json``  ``format`` ("cllm_rt.trajectories/1"); ``settings`` (block_size, max_new_tokens, seed,
      prompt_template, drop_repetitive, keep_reference, shard_size, eos_token_ids); ``model`` (model_type,
      vocab_size, dtype, and a fingerprint: sha256 over every parameter's name, shape and first values);
      ``tokenizer`` (class, vocab size, sha256 of the vocabulary and special tokens; null without one);
      ``prompts`` (count and sha256 of all prompt/reference token ids: catches another data file or
      tokenization); ``identity`` (sha256 of all the above); progress: ``shards`` (file, first_prompt,
      prompts, kept, blocks, repetitive), ``prompts_done``, ``prompts_kept``, ``prompts_repetitive`` (answers
      dropped as repetitive; null when a shard predates the count), ``complete``.
  ``shard-SSSSS.safetensors``  prompts ``[S*shard_size, (S+1)*shard_size)`` of the data, flat tensors:
      ``prompt_index`` int64 [P] (data line of each kept prompt); ``prompt_tokens``/``answer_tokens``
      (/``reference_tokens`` with keep_reference) int32 with ``*_offsets`` int64 [P+1];
      ``block_prompt``, ``block_index``, ``block_valid`` int64 [NB]; ``states`` int32 [total states, n] with
      ``state_offsets`` int64 [NB+1] (block b owns states ``state_offsets[b]:state_offsets[b+1]``, the last
      one its fixed point). Metadata: format, the manifest identity, shard index, prompts, kept, blocks,
      repetitive.

Resume: a shard is finished exactly when its file exists (every write is atomic, :mod:`cllm_rt.atomic_io`),
so rerunning the same command skips finished shards and no prompt is lost or duplicated. A rerun with other
settings, another model, tokenizer or data stops with an error naming what differs. Under torchrun, rank r
collects shards ``r::world_size`` (whole shards, not single prompts, so a resumed run may use another
process count); rank 0 merges every rank's shards into the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..atomic_io import atomic_write, atomic_write_json
from ..draft_head import model_fingerprint  # noqa: F401  (identities of collected and trained models)

FORMAT = "cllm_rt.trajectories/1"
MANIFEST = "manifest.json"
_SHARD_NAME = re.compile(r"shard-(\d{5})\.safetensors")


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


# ---------------------------------------------------------------- identities (what a rerun must match)

def tokenizer_fingerprint(tokenizer) -> dict:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return {"class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
            "sha256": hashlib.sha256((vocab + special).encode()).hexdigest()}


def prompts_fingerprint(prompts) -> dict:
    """Count and hash of every prompt's ``tokens`` and ``reference``."""
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(json.dumps([p.tokens, p.reference]).encode())
    return {"count": len(prompts), "sha256": digest.hexdigest()}


def check_resumable(out_dir: str, identity: dict) -> None:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        if os.path.isdir(out_dir) and any(not name.startswith(".") for name in os.listdir(out_dir)):
            raise FileExistsError(f"{out_dir} is not empty and holds no {MANIFEST}: not a trajectory directory "
                                  "of cllm_rt; collect into a new or empty directory")
        return
    previous = read_manifest(out_dir)
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


def finished_shards(out_dir: str, identity: str) -> dict[int, dict]:
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
                                      "blocks": int(meta["blocks"]),
                                      "repetitive": int(meta["repetitive"]) if "repetitive" in meta else None}
    return found


def write_manifest(out_dir: str, identity: dict, num_shards: int | None = None) -> None:
    shards = finished_shards(out_dir, identity["identity"])
    complete = num_shards is not None and len(shards) == num_shards
    atomic_write_json(os.path.join(out_dir, MANIFEST), {
        **identity, "shards": [shards[s] for s in sorted(shards)], "complete": complete,
        "prompts_done": sum(s["prompts"] for s in shards.values()),
        "prompts_kept": sum(s["kept"] for s in shards.values()),
        "prompts_repetitive": None if any(s["repetitive"] is None for s in shards.values())
        else sum(s["repetitive"] for s in shards.values())})


def read_manifest(out_dir: str) -> dict:
    with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as f:
        return json.load(f)


def _flat(sequences: list[list[int]], name: str) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([0] + [len(s) for s in sequences], dtype=torch.int64)
    return {f"{name}_tokens": torch.tensor([t for s in sequences for t in s], dtype=torch.int32),
            f"{name}_offsets": lengths.cumsum(0)}


def _unflat(tensors: dict[str, torch.Tensor], name: str) -> list[list[int]]:
    tokens, offsets = tensors[f"{name}_tokens"].tolist(), tensors[f"{name}_offsets"].tolist()
    return [tokens[a:b] for a, b in zip(offsets, offsets[1:])]


def write_shard(out_dir: str, shard: int, first_prompt: int, num_prompts: int,
                 collected: list[PromptTrajectories], identity: str, repetitive: int) -> None:
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
                "prompts": str(num_prompts), "kept": str(len(collected)), "blocks": str(len(blocks)),
                "repetitive": str(repetitive)}
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
    manifest = read_manifest(directory)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{directory}/{MANIFEST} has format {manifest.get('format')!r}; expected {FORMAT!r}")
    if not manifest["complete"]:
        warnings.warn(f"{directory}: collection incomplete ({manifest['prompts_done']} of "
                      f"{manifest['prompts']['count']} prompts); using the finished shards", stacklevel=2)
    prompts = [p for shard in manifest["shards"] for p in _read_shard(os.path.join(directory, shard["file"]))]
    return Trajectories(manifest, sorted(prompts, key=lambda p: p.index))
