"""The demo's methods table: speed and quality of seven decoding methods on held-out prompts per domain.

Methods (all greedy, batch size 1, the same prompts and ``max_new_tokens``):
  ``target+hf``       the target with ``model.generate`` (the baseline every speedup is relative to)
  ``target+lookup``   the target with ``model.generate(prompt_lookup_num_tokens=10)`` (prompt lookup decoding)
  ``target+ar``       the target with ``cllm_rt.generate(drafts=None, block_size=1)`` (AR, same runtime)
  ``target+jacobi``   the target with ``cllm_rt.generate(drafts=None, block_size=n)`` (plain Jacobi decoding)
  ``target+best``     the target with ``cllm_rt.generate(drafts="auto")``: cllm_rt's best exact decoding
  ``cllm+best``       the consistency-trained model, same decoding
  ``exact+best``      the target with the draft head the demo trained (the exact variant), same decoding

Fair drafts: the "corpus" draft source of ``drafts="auto"`` would by default read every earlier output of
the process, including other methods' outputs of the same prompt. Each (method, domain) therefore gets its
own :class:`cllm_rt.runtime.drafts.Corpus`, seeded with the same training-set answers of the target (the
collected trajectories' answers, :func:`training_corpus`) and filled only by that run's own earlier
prompts and outputs, as ``generate`` adds them.

Measurement: every method runs on every prompt once; methods are interleaved prompt by prompt in a seeded
shuffled order, so load from other processes on a shared machine slows all methods alike, and
``speedup`` is a ratio measured in one run. One warm-up prompt per method is not counted (with a throwaway
corpus). ``tokens_per_forward`` = new tokens / model forwards *including the prefill* (the same count for
every method; HF's forwards are counted with a forward hook, cllm_rt's from its stats), so autoregressive
decoding reads exactly 1.0. Quality is measured against the target's greedy output (agreement) and
against the data's reference (accuracy), see :func:`cllm_rt.demo.data.quality`.

Drift of a trained model from the target, three ways (issue #20): greedy agreement (difflib similarity of
the whole answer to the target's greedy answer, as the training guard rail measures it; ``same`` is the
exact-match rate beside it), final-answer agreement (math), and the target's perplexity on the model's
outputs (:func:`answer_nll`: the target scores each output after its prompt, untimed, once per run;
``target_perplexity`` = exp(summed NLL / summed output tokens) over a row's prompts). An output that reads
unlike anything the target would write scores high even where its final answer agrees.

Per-run records are appended to ``runs.jsonl`` as they finish: an interrupted evaluation resumes (each
corpus is rebuilt from the records already there, so the resumed runs see what they would have seen).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..atomic_io import atomic_write_text
from ..runtime.decoding import generate as cllm_generate
from ..runtime.drafts import Corpus
from . import data

METHODS = ("target+hf", "target+lookup", "target+ar", "target+jacobi", "target+best", "cllm+best", "exact+best")
BASELINE = "target+hf"  # every speedup is relative to it, and its output is the target's greedy answer


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


def run_method(method: str, models: dict, input_ids: torch.Tensor, max_new_tokens: int, settings: EvalSettings,
               corpus: Corpus) -> dict:
    """Decode one prompt ``input_ids`` [1, L] with ``method``; tokens, forwards, seconds (and draft stats)."""
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
        decoding = {"ar": dict(drafts=None, block_size=1), "jacobi": dict(drafts=None, block_size=settings.block_size),
                    "best": dict(drafts="auto", block_size=settings.block_size, corpus=corpus)}[how]
        start = time.perf_counter()
        out = cllm_generate(model, input_ids, max_new_tokens=max_new_tokens, seed=settings.seed, **decoding)
        seconds = time.perf_counter() - start
        tokens = out.sequences[0, length:length + out.stats.new_tokens[0]].tolist()
        forwards = out.stats.forward_passes + 1  # + the prefill
        record["accepted_histogram"] = out.stats.accepted_histogram
        if how == "best":
            record["accepted_by_source"] = dict(out.stats.accepted_by_source)
            record["budgets"] = {str(k): v for k, v in out.stats.budgets.items()}
    # an EOS that ends the answer counts as a generated token, for every method alike
    record.update({"tokens": tokens, "forwards": forwards, "seconds": seconds})
    return record


def answer_nll(model, prompt: list[int], answer: list[int]) -> float:
    """Summed negative log-likelihood (nats, in float64) of ``answer`` after ``prompt`` under ``model``: one
    teacher-forced forward, logits at the answer's positions only (0.0 for an empty answer)."""
    if not answer:
        return 0.0
    ids = torch.tensor([prompt + answer], device=model.device)
    with torch.inference_mode():
        # the last len(answer) + 1 positions: the prompt's last token predicts answer[0], …; the final one
        # predicts past the answer and is dropped
        logits = model(ids, logits_to_keep=len(answer) + 1).logits[0, :-1]  # [len(answer), V]
    log_probs = torch.log_softmax(logits.double(), -1)
    return -log_probs.gather(1, torch.tensor(answer, device=logits.device)[:, None]).sum().item()


def training_corpus(answers: list[list[int]]) -> Corpus:
    """A draft corpus of the target's own answers to training prompts (fixed points it produced)."""
    corpus = Corpus()
    for answer in answers:
        corpus.add(answer)
    return corpus


def evaluate(models: dict, tokenizer, examples: dict[str, list[data.Example]], max_new_tokens: dict[str, int],
             out_dir: str, settings: EvalSettings = EvalSettings(),
             corpus_seed: dict[str, list[list[int]]] | None = None, methods=METHODS, progress: bool = True) -> list[dict]:
    """Run every method on every example (resuming ``out_dir/runs.jsonl``); return all run records.

    ``corpus_seed[domain]``: the target's training-set answers that seed each (method, domain) corpus.
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "runs.jsonl")
    done = {}
    if os.path.exists(path):
        for r in data.read_jsonl(path, allow_torn_tail=True):  # a line torn by a kill: that run is redone
            done[(r["domain"], r["index"], r["method"])] = r
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in done.values()))  # no torn tail to append to
    jobs = [(d, i, ex) for d, exs in examples.items() for i, ex in enumerate(exs)]
    order = random.Random(f"{settings.seed}:eval-order")
    corpora = {(m, d): training_corpus((corpus_seed or {}).get(d, [])) for m in methods for d in examples}
    bar = tqdm(total=len(jobs) * len(methods), initial=sum(1 for k in done if k[2] in methods), unit="run",
               desc="evaluate", disable=not progress)
    warmed = set()
    with open(path, "a", encoding="utf-8") as log:
        for domain, index, example in jobs:
            prompt = data.prompt_tokens(tokenizer, example)
            input_ids = torch.tensor([prompt])
            shuffled = list(methods)
            order.shuffle(shuffled)
            for method in shuffled:
                corpus = corpora[(method, domain)]
                if (domain, index, method) in done:  # as generate would have added it
                    corpus.add(prompt + done[(domain, index, method)]["tokens"])
                    continue
                if method not in warmed:  # first call of a method pays one-time costs: not timed
                    run_method(method, models, input_ids, min(8, max_new_tokens[domain]), settings, Corpus())
                    warmed.add(method)
                record = run_method(method, models, input_ids, max_new_tokens[domain], settings, corpus)
                if "target" in models:  # drift: how likely the target finds this output (untimed)
                    record["target_nll"] = answer_nll(models["target"], prompt, record["tokens"])
                record.update({"domain": domain, "index": index, "method": method, "source": example.source,
                               "prompt_tokens": input_ids.shape[1]})
                log.write(json.dumps(record) + "\n")
                log.flush()
                done[(domain, index, method)] = record
                bar.update(1)
    bar.close()
    return [done[(d, i, m)] for d, i, _ in jobs for m in methods]


def summarize(records: list[dict], tokenizer, examples: dict[str, list[data.Example]],
              methods=METHODS) -> list[dict]:
    """One table row per (method, domain) of ``methods``: speed, tokens per forward, quality, loop share
    (``records`` must hold the baseline's runs too)."""
    by_key = {(r["domain"], r["index"], r["method"]): r for r in records}
    rows = []
    for domain, exs in examples.items():
        baseline = [by_key[(domain, i, BASELINE)] for i in range(len(exs))]
        base_rate = sum(len(r["tokens"]) for r in baseline) / sum(r["seconds"] for r in baseline)
        for method in methods:
            runs = [by_key.get((domain, i, method)) for i in range(len(exs))]
            if any(r is None for r in runs):
                continue
            tokens = sum(len(r["tokens"]) for r in runs)
            seconds = sum(r["seconds"] for r in runs)
            quality: dict[str, list[float]] = {}
            for ex, run, ref in zip(exs, runs, baseline):
                q = data.quality(domain, _text(tokenizer, run["tokens"]), _text(tokenizer, ref["tokens"]),
                                 ex.reference, run["tokens"], ref["tokens"])
                for k, v in q.items():
                    quality.setdefault(k, []).append(v)
            # Jacobi and drafts run through a looping output at many tokens per forward, so a looping target
            # looks fast for the wrong reason: report tokens per forward over the non-looping outputs beside it.
            looping = [data.falls_into_loop(r["tokens"]) for r in runs]
            scored = all("target_nll" in r for r in runs) and tokens  # records written before it lack it
            drift = {"target_perplexity": math.exp(sum(r["target_nll"] for r in runs) / tokens)} if scored else {}
            clean = [r for r, loops in zip(runs, looping) if not loops]
            rows.append({
                "method": method, "domain": domain, "prompts": len(exs), "new_tokens": tokens,
                "tokens_per_forward": tokens / sum(r["forwards"] for r in runs),
                "non_loop_tokens_per_forward": (sum(len(r["tokens"]) for r in clean) /
                                                sum(r["forwards"] for r in clean)) if clean else None,
                "tokens_per_second": tokens / seconds, "speedup": tokens / seconds / base_rate,
                "loop_share": sum(looping) / len(runs),
                "eos_share": sum(bool(r["tokens"]) and r["tokens"][-1] == tokenizer.eos_token_id for r in runs) / len(runs),
                **{k: sum(v) / len(v) for k, v in quality.items()}, **drift,
                **_summed(runs, "accepted_histogram"), **_summed(runs, "accepted_by_source"),
            })
    return rows


def _summed(runs: list[dict], key: str) -> dict:
    """``{key: the element-wise sum over runs}`` for a list- or dict-valued statistic; {} where absent."""
    if key not in runs[0]:
        return {}
    if isinstance(runs[0][key], dict):
        return {key: {k: sum(r[key][k] for r in runs) for k in runs[0][key]}}
    width = max(len(r[key]) for r in runs)
    return {key: [sum(r[key][k] for r in runs if k < len(r[key])) for k in range(width)]}


def _text(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


QUALITY_COLUMNS = {
    "math": [("answer_agreement", "answer agree"), ("accuracy", "accuracy")],
    "sql": [("agreement", "SQL agree"), ("exact_match", "exact match")],
    "code": [("token_agreement", "token agree@64")],
    "chat": [("token_agreement", "token agree@64")],
}


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table (one line per method and domain); ``same``: outputs token for token the
    target's greedy output (the exact methods must read 100%)."""
    header = (f"{'domain':<6} {'method':<13} {'tok/fwd':>7} {'non-loop':>8} {'tok/s':>6} {'speedup':>7} "
              f"{'loops':>6} {'same':>5}  quality")
    lines = [header, "-" * (len(header) + 30)]
    for row in rows:
        quality = [f"{label} {row[key]:.0%}" for key, label in QUALITY_COLUMNS.get(row["domain"], []) if key in row]
        if "target_perplexity" in row:
            quality.append(f"target ppl {row['target_perplexity']:.2f}")
        quality = ", ".join(quality)
        clean = row["non_loop_tokens_per_forward"]
        lines.append(f"{row['domain']:<6} {row['method']:<13} {row['tokens_per_forward']:7.2f} "
                     f"{'-' if clean is None else f'{clean:.2f}':>8} {row['tokens_per_second']:6.1f} "
                     f"{row['speedup']:6.2f}x {row['loop_share']:6.0%} {row['same']:5.0%}  {quality}")
    return "\n".join(lines)


def plot(rows: list[dict], out_dir: str) -> list[str]:
    """speedup.png (bars per method and domain) and tokens_per_forward.png (tokens made final per forward,
    target, CLLM and the exact variant). Returns the files written; none (with a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping speedup.png and tokens_per_forward.png "
              "(pip install matplotlib, or the 'demo' extra)")
        return []
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
    written = [_save(plt, fig, os.path.join(out_dir, "speedup.png"))]

    fig, ax = plt.subplots(figsize=(7, 4))
    shown = ("target+jacobi", "target+best", "cllm+best", "exact+best")
    for offset, method in zip((-0.3, -0.1, 0.1, 0.3), shown):
        hist = [0] * 65
        for r in rows:
            if r["method"] == method and "accepted_histogram" in r:
                for k, c in enumerate(r["accepted_histogram"][:65]):
                    hist[k] += c
        total = sum(hist)
        if total:
            last = max(k for k, c in enumerate(hist) if c)
            ax.bar([k + offset for k in range(1, last + 1)], [hist[k] / total for k in range(1, last + 1)], 0.2,
                   label=f"{method} (mean {sum(k * c for k, c in enumerate(hist)) / total:.2f})")
    ax.set_xlabel("tokens made final by one decode forward")
    ax.set_ylabel("share of forwards")
    ax.set_title("Tokens per forward, all domains")
    ax.legend()
    return written + [_save(plt, fig, os.path.join(out_dir, "tokens_per_forward.png"))]


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
