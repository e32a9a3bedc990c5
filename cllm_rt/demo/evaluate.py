"""The demo's methods table: speed and quality of six decoding methods on held-out prompts per domain.

Methods (all greedy, batch size 1, the same prompts and ``max_new_tokens``):
  ``target+hf``       the target model with ``model.generate`` (the baseline every speedup is relative to)
  ``target+ar``       the target with ``cllm_rt.generate(block_size=1)`` (autoregressive, same runtime)
  ``target+jacobi``   the target with ``cllm_rt.generate(block_size=n)``
  ``target+lookup``   the target with ``model.generate(prompt_lookup_num_tokens=10)`` (prompt lookup decoding)
  ``cllm+ar``, ``cllm+jacobi``  the consistency-trained model, in the cllm_rt runtime

Measurement: every method runs on every prompt once; methods are interleaved prompt by prompt in a seeded
shuffled order, so load from other processes on a shared machine slows all methods alike, and
``speedup`` is a ratio measured in one run. One warm-up prompt per method is not counted.
``tokens_per_forward`` = new tokens / model forwards *including the prefill* (the same count for every
method; HF's forwards are counted with a forward hook, cllm_rt's from its stats), so autoregressive
decoding reads exactly 1.0. Quality is measured against the target's greedy output (agreement) and
against the data's reference (accuracy), see :func:`cllm_rt.data.quality`.

Per-run records are appended to ``runs.jsonl`` as they finish: an interrupted evaluation resumes.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import data
from ..atomic_io import atomic_write_text
from ..runtime.decoding import generate as cllm_generate

METHODS = ("target+hf", "target+ar", "target+jacobi", "target+lookup", "cllm+ar", "cllm+jacobi")
BASELINE = "target+hf"
REFERENCE_OUTPUT = "target+hf"  # the target's greedy output, which agreement is measured against


@dataclass(frozen=True)
class EvalSettings:
    block_size: int = 16
    lookup_tokens: int = 10
    seed: int = 0


def _count_forwards(model):
    """A forward hook counting calls of ``model`` (the HF top-level module that ``generate`` calls)."""
    counter = {"calls": 0}

    def hook(*_):
        counter["calls"] += 1

    return counter, model.register_forward_hook(hook)


def run_method(method: str, models: dict, input_ids: torch.Tensor, max_new_tokens: int,
               settings: EvalSettings) -> dict:
    """Decode one prompt ``input_ids`` [1, L] with ``method``; tokens, forwards, seconds (and histogram)."""
    which, how = method.split("+")
    model = models[which]
    length = input_ids.shape[1]
    record: dict = {}
    if how in ("hf", "lookup"):
        extra = {"prompt_lookup_num_tokens": settings.lookup_tokens} if how == "lookup" else {}
        counter, handle = _count_forwards(model)
        try:
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                     max_new_tokens=max_new_tokens, **extra)
            seconds = time.perf_counter() - start
        finally:
            handle.remove()
        tokens = out[0, length:].tolist()
        forwards = counter["calls"]
    else:
        block = 1 if how == "ar" else settings.block_size
        start = time.perf_counter()
        out = cllm_generate(model, input_ids, max_new_tokens=max_new_tokens, block_size=block, seed=settings.seed)
        seconds = time.perf_counter() - start
        tokens = out.sequences[0, length:length + out.stats.new_tokens[0]].tolist()
        forwards = out.stats.forward_passes + 1  # + the prefill
        record["accepted_histogram"] = out.stats.accepted_histogram
        record["decode_tokens_per_forward"] = out.stats.tokens_per_forward
    # an EOS that ends the answer counts as a generated token, for every method alike
    record.update({"tokens": tokens, "forwards": forwards, "seconds": seconds})
    return record


def evaluate(models: dict, tokenizer, examples: dict[str, list[data.Example]], max_new_tokens: dict[str, int],
             out_dir: str, settings: EvalSettings = EvalSettings(), methods=METHODS, progress: bool = True) -> list[dict]:
    """Run every method on every example (resuming ``out_dir/runs.jsonl``); return all run records."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "runs.jsonl")
    done = {}
    if os.path.exists(path):
        kept = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line torn by a kill: that run is redone
                    continue
                done[(r["domain"], r["index"], r["method"])] = r
                kept.append(line if line.endswith("\n") else line + "\n")
        atomic_write_text(path, "".join(kept))  # drop any torn tail before appending
    jobs = [(d, i, ex) for d, exs in examples.items() for i, ex in enumerate(exs)]
    order = random.Random(f"{settings.seed}:eval-order")
    total = len(jobs) * len(methods)
    bar = tqdm(total=total, initial=sum(1 for k in done if k[2] in methods), unit="run", desc="evaluate",
               disable=not progress)
    warmed = set()
    with open(path, "a", encoding="utf-8") as log:
        for domain, index, example in jobs:
            input_ids = tokenizer(example.prompt, return_tensors="pt")["input_ids"]
            shuffled = list(methods)
            order.shuffle(shuffled)
            for method in shuffled:
                if (domain, index, method) in done:
                    continue
                if method not in warmed:  # first call of a method pays one-time costs: not timed
                    run_method(method, models, input_ids, min(8, max_new_tokens[domain]), settings)
                    warmed.add(method)
                record = run_method(method, models, input_ids, max_new_tokens[domain], settings)
                record.update({"domain": domain, "index": index, "method": method, "source": example.source,
                               "prompt_tokens": input_ids.shape[1]})
                log.write(json.dumps(record) + "\n")
                log.flush()
                done[(domain, index, method)] = record
                bar.update(1)
    bar.close()
    return [done[(d, i, m)] for d, i, _ in jobs for m in methods]


def summarize(records: list[dict], tokenizer, examples: dict[str, list[data.Example]]) -> list[dict]:
    """One table row per (method, domain): speed, tokens per forward, quality, loop share."""
    by_key = {(r["domain"], r["index"], r["method"]): r for r in records}
    rows = []
    for domain, exs in examples.items():
        for method in METHODS:
            runs = [by_key.get((domain, i, method)) for i in range(len(exs))]
            if any(r is None for r in runs):
                continue
            baseline = [by_key[(domain, i, BASELINE)] for i in range(len(exs))]
            reference = [by_key[(domain, i, REFERENCE_OUTPUT)] for i in range(len(exs))]
            tokens = sum(len(r["tokens"]) for r in runs)
            seconds = sum(r["seconds"] for r in runs)
            base_rate = sum(len(r["tokens"]) for r in baseline) / sum(r["seconds"] for r in baseline)
            quality: dict[str, list[float]] = {}
            for ex, run, ref in zip(exs, runs, reference):
                q = data.quality(domain, _text(tokenizer, run["tokens"]), _text(tokenizer, ref["tokens"]),
                                     ex.reference, run["tokens"], ref["tokens"])
                for k, v in q.items():
                    quality.setdefault(k, []).append(v)
            histogram = None
            if "accepted_histogram" in runs[0]:
                width = max(len(r["accepted_histogram"]) for r in runs)
                histogram = [sum(r["accepted_histogram"][k] if k < len(r["accepted_histogram"]) else 0 for r in runs)
                             for k in range(width)]
            # Jacobi runs through a looping output at up to a block per forward, so a looping target looks
            # fast for the wrong reason: report tokens per forward over the non-looping outputs beside it.
            clean = [r for r in runs if not data.loops(r["tokens"])]
            rows.append({
                "method": method, "domain": domain, "prompts": len(exs), "new_tokens": tokens,
                "tokens_per_forward": tokens / sum(r["forwards"] for r in runs),
                "non_loop_tokens_per_forward": (sum(len(r["tokens"]) for r in clean) /
                                                sum(r["forwards"] for r in clean)) if clean else None,
                "tokens_per_second": tokens / seconds, "speedup": tokens / seconds / base_rate,
                "loop_share": sum(data.loops(r["tokens"]) for r in runs) / len(runs),
                "eos_share": sum(bool(r["tokens"]) and r["tokens"][-1] == tokenizer.eos_token_id for r in runs) / len(runs),
                **{k: sum(v) / len(v) for k, v in quality.items()},
                **({"accepted_histogram": histogram} if histogram else {}),
            })
    return rows


def _text(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


QUALITY_COLUMNS = {
    "math": [("answer_agreement", "answer agree"), ("accuracy", "accuracy")],
    "sql": [("agreement", "SQL agree"), ("exact_match", "exact match")],
    "code": [("token_agreement", "token agree")],
    "chat": [("token_agreement", "token agree")],
}


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table (one line per method and domain)."""
    header = (f"{'domain':<6} {'method':<14} {'tok/fwd':>7} {'non-loop':>8} {'tok/s':>7} {'speedup':>7} "
              f"{'loops':>6}  quality")
    lines = [header, "-" * len(header)]
    for row in rows:
        quality = ", ".join(f"{label} {row[key]:.1%}" for key, label in QUALITY_COLUMNS.get(row["domain"], [])
                            if key in row)
        clean = row["non_loop_tokens_per_forward"]
        lines.append(f"{row['domain']:<6} {row['method']:<14} {row['tokens_per_forward']:7.2f} "
                     f"{'-' if clean is None else f'{clean:.2f}':>8} "
                     f"{row['tokens_per_second']:7.1f} {row['speedup']:6.2f}x {row['loop_share']:6.1%}  {quality}")
    return "\n".join(lines)


def plot(rows: list[dict], out_dir: str) -> list[str]:
    """speedup.png (bars per method and domain) and tokens_per_forward.png (accepted tokens per Jacobi
    forward, target vs CLLM). Returns the files written; none (with a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping speedup.png and tokens_per_forward.png "
              "(pip install matplotlib, or the 'demo' extra)")
        return []
    written = []
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(domains) + 3), 4))
    width = 0.8 / max(1, len(methods))
    for k, method in enumerate(methods):
        values = [next((r["speedup"] for r in rows if r["domain"] == d and r["method"] == method), 0) for d in domains]
        bars = ax.bar([i + k * width for i in range(len(domains))], values, width, label=method)
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(domains))], domains)
    ax.set_ylabel(f"tokens/s relative to {BASELINE}")
    ax.set_title("Greedy decoding speed, batch size 1")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(os.path.join(out_dir, "speedup.png"))
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for method in ("target+jacobi", "cllm+jacobi"):
        hist = [0] * 64
        for r in rows:
            if r["method"] == method and "accepted_histogram" in r:
                for k, c in enumerate(r["accepted_histogram"]):
                    hist[k] += c
        total = sum(hist)
        if total:
            last = max(k for k, c in enumerate(hist) if c)
            ax.bar([k + (0.2 if method.startswith("cllm") else -0.2) for k in range(1, last + 1)],
                   [hist[k] / total for k in range(1, last + 1)], 0.4, label=f"{method} (mean "
                   f"{sum(k * c for k, c in enumerate(hist)) / total:.2f})")
    ax.set_xlabel("tokens made final by one Jacobi forward")
    ax.set_ylabel("share of forwards")
    ax.set_title("Tokens per forward, all domains")
    ax.legend()
    fig.tight_layout()
    written.append(os.path.join(out_dir, "tokens_per_forward.png"))
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written
