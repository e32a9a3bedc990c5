"""Seeded sampling on a real model: cllm_rt's default decoding vs HF sampling vs HF prompt-lookup sampling.

SmolLM2-135M-Instruct (``cllm_rt.models``) on held-out chat and GSM8K prompts, at each temperature (0 is
greedy), every method on every prompt in a seeded random order. Every method samples from the same
distribution (temperature, HF's default top_k=50); cllm_rt's tokens are its seeded Gumbel-max samples, HF's
are torch.multinomial draws, so the sequences differ and so do their lengths and loops: compare tokens/s and
tokens per forward, not outputs. Reuses bench_decoding's prompts, batching and forward counting.

    PYTHONPATH=. python benchmarks/bench_sampling.py [--temperatures 0 0.7 1.0] [--prompts 2]
        [--max-new-tokens 128] [--domains chat math] [--methods hf hf-lookup drafts] [--json out.json]

With ``--temperatures 0 --methods drafts`` it runs nothing this branch added (no sampling argument), so the
same command under another checkout's PYTHONPATH measures greedy speed before/after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch

import cllm_rt
from bench_decoding import ForwardCounter, _cut, batches, machine, prompts_of
from cllm_rt.demo import data
from cllm_rt.models import load_model
from cllm_rt.runtime.drafts import Corpus

METHODS = {"hf": "HF generate", "hf-lookup": "HF prompt lookup (10 tokens)", "drafts": "cllm_rt default"}
TOP_K = 50  # transformers' default, given explicitly to both sides


def run(method, model, counter, ids, mask, max_new_tokens, temperature, seed, corpus):
    """(new tokens per row, decode row-steps, seconds) of one call."""
    sampling = dict(do_sample=True, temperature=temperature, top_k=TOP_K) if temperature > 0 else {}
    start = time.perf_counter()
    if method.startswith("hf"):
        before = counter.calls
        torch.manual_seed(seed)
        extra = {"prompt_lookup_num_tokens": 10} if method == "hf-lookup" else {}
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             **(sampling or dict(do_sample=False)), **extra)
        seconds, forwards = time.perf_counter() - start, counter.calls - before - 1
        rows = [_cut(r.tolist(), model.generation_config.eos_token_id) for r in out[:, ids.shape[1]:]]
        return rows, forwards * len(rows), seconds
    out = cllm_rt.generate(model, ids, mask, max_new_tokens=max_new_tokens, corpus=corpus,
                           **(dict(sampling, seed=seed) if sampling else {}))
    seconds = time.perf_counter() - start
    rows = [r[ids.shape[1]:ids.shape[1] + n].tolist() for r, n in zip(out.sequences, out.stats.new_tokens)]
    return rows, sum(out.stats.accepted_histogram), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 0.7, 1.0])
    parser.add_argument("--prompts", type=int, default=2, help="held-out prompts per domain")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--domains", nargs="+", choices=data.DOMAINS, default=["chat", "math"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=data.default_data_dir())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = machine()
    model, tokenizer = load_model("smollm2-135m-instruct", dtype="float32")
    counter = ForwardCounter(model)
    warm = tokenizer("Hello", return_tensors="pt")
    for method in args.methods:  # first calls allocate; keep them out of the timings
        run(method, model, counter, warm.input_ids, warm.attention_mask, 16, 1.0, 0, Corpus())
    variants = [(m, t) for m in args.methods for t in args.temperatures]
    results = []
    for domain in args.domains:
        prompts = prompts_of(domain, tokenizer, args.prompts, args.data_dir)
        corpora = {v: Corpus() for v in variants}
        totals = {v: {"tokens": 0, "steps": 0, "seconds": 0.0, "rows": 0} for v in variants}
        order = random.Random(f"{args.seed}:{domain}")
        for index, (ids, mask) in enumerate(batches(prompts, 1, tokenizer.pad_token_id or 0)):
            for method, temperature in order.sample(variants, len(variants)):
                rows, steps, seconds = run(method, model, counter, ids, mask, args.max_new_tokens, temperature,
                                           args.seed + index, corpora[method, temperature])
                t = totals[method, temperature]
                t["tokens"] += sum(map(len, rows))
                t["steps"] += steps
                t["seconds"] += seconds
                t["rows"] += len(rows)
        for (method, temperature), t in totals.items():
            results.append({"domain": domain, "temperature": temperature, "method": method,
                            "tokens_per_second": t["tokens"] / t["seconds"],
                            "tokens_per_forward": (t["tokens"] - t["rows"]) / max(t["steps"], 1),
                            "tokens": t["tokens"], "seconds": t["seconds"], "prompts": t["rows"]})
            print(f"{domain} T={temperature} {METHODS[method]}: {results[-1]['tokens_per_second']:.2f} tok/s, "
                  f"{results[-1]['tokens_per_forward']:.2f} tok/fwd", flush=True)
    info["load_average_after"] = os.getloadavg()
    info["cllm_rt"] = os.path.dirname(cllm_rt.__file__)
    print_table(results)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": info, "settings": vars(args), "results": results}, f, indent=1)
    print(f"machine: {info['cpu']} (AVX-512: {info['avx512']}), {info['threads']} threads, torch {info['torch']}; "
          f"load average {info['load_average'][0]:.2f} before, {info['load_average_after'][0]:.2f} after")


def print_table(results: list[dict]) -> None:
    get = {(r["domain"], r["temperature"], r["method"]): r for r in results}
    print("| domain | T | method | tok/s | tok/fwd | vs HF | vs HF lookup |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        key = (r["domain"], r["temperature"])
        ratios = [r["tokens_per_second"] / get[key + (m,)]["tokens_per_second"] if key + (m,) in get else None
                  for m in ("hf", "hf-lookup")]
        cells = " | ".join(f"{v:.2f}x" if v else "—" for v in ratios)
        print(f"| {r['domain']} | {r['temperature']:g} | {METHODS[r['method']]} | {r['tokens_per_second']:.2f} | "
              f"{r['tokens_per_forward']:.2f} | {cells} |")


if __name__ == "__main__":
    main()
