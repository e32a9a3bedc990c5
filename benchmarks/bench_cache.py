"""What a row joining or leaving a running batch costs, and what memory a row holds: the paged ``JacobiCache``
against the dense layout it replaced.

SmolLM2-135M-Instruct's cache shapes (30 layers, 3 KV heads of 64, float32: 46 KB per position), no model
forward: ``--rows`` rows of ``--context`` committed tokens are running, each with a budget of ``--budget``; one
row of ``--join`` tokens joins, then leaves, in interleaved rounds (medians reported).

* **paged**: ``JacobiCache.extend`` (the joining row's pages copied into free ones) and ``select_rows`` (its
  pages back on the free list);
* **dense**: what the dense cache did (cllm_rt before the paged cache, git 9f7e61f ``runtime/cache.py``):
  per layer, K and V of ``[B, Hkv, S_max, D]`` with ``S_max`` the group's longest prompt + largest budget + 64,
  a join ``torch.cat`` of the whole cache with the new row padded to ``S_max``, a leave ``index_select`` of the
  rows that stay.

Memory: the bytes the paged pools hold against ``rows x S_max`` positions of the dense layout.

    OMP_NUM_THREADS=1 python benchmarks/bench_cache.py [--rows 1 4 8] [--context 1024] [--budget 2048]
        [--join 200] [--rounds 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench_decoding import machine

from cllm_rt.runtime.cache import JacobiCache

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M
BYTES_PER_POSITION = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4


def filled_cache(rows: int, tokens: int) -> JacobiCache:
    """A paged cache of ``rows`` rows holding ``tokens`` committed tokens each, written by its own write path."""
    cache = JacobiCache(LAYERS, torch.zeros(rows, dtype=torch.long), max_len=1 << 20)
    cache.begin_block(tokens)
    block = torch.randn(rows, KV_HEADS, tokens, HEAD_DIM)
    for layer in cache.layers:
        layer.update(block, block)
    cache.commit(torch.full((rows,), tokens), [tokens] * rows)
    return cache


def paged_round(cache: JacobiCache, joining: JacobiCache) -> tuple[float, float]:
    start = time.perf_counter()
    cache.extend(joining)
    joined = time.perf_counter()
    keep = list(range(cache.batch_size - 1))
    cache.select_rows(torch.tensor(keep), keep)
    return joined - start, time.perf_counter() - joined


def dense_round(layers: list[list[torch.Tensor]], row: list[torch.Tensor]) -> tuple[float, float]:
    start = time.perf_counter()
    grown = [[torch.cat([mine, theirs]) for mine, theirs in zip(layer, new)] for layer, new in zip(layers, row)]
    joined = time.perf_counter()
    keep = torch.arange(grown[0][0].shape[0] - 1)
    [[x.index_select(0, keep) for x in layer] for layer in grown]
    return joined - start, time.perf_counter() - joined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--context", type=int, default=1024, help="committed tokens of every running row")
    parser.add_argument("--budget", type=int, default=2048, help="max_new_tokens of every row")
    parser.add_argument("--join", type=int, default=200, help="prompt tokens of the joining row")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = machine()
    s_max = max(args.context, args.join) + args.budget + 64
    results = []
    print(f"{'rows':>4} | {'join: paged':>11} {'dense':>9} | {'leave: paged':>12} {'dense':>9} | "
          f"{'MB held: paged':>14} {'dense':>7}")
    for rows in args.rows:
        cache, joining = filled_cache(rows, args.context), filled_cache(1, args.join)
        dense = [[torch.randn(rows, KV_HEADS, s_max, HEAD_DIM) for _ in "kv"] for _ in range(LAYERS)]
        dense_row = [[torch.randn(1, KV_HEADS, s_max, HEAD_DIM) for _ in "kv"] for _ in range(LAYERS)]
        times = {"paged": [], "dense": []}
        for _ in range(args.rounds):
            times["paged"].append(paged_round(cache, joining))
            times["dense"].append(dense_round(dense, dense_row))
        median = {f"{kind}_{what}_ms": statistics.median(t[i] for t in times[kind]) * 1e3
                  for kind in times for i, what in enumerate(("join", "leave"))}
        held = {"paged_mb": cache.num_pages * cache.page_size * BYTES_PER_POSITION / 1e6,
                "dense_mb": rows * s_max * BYTES_PER_POSITION / 1e6}
        results.append({"rows": rows, **median, **held})
        print(f"{rows:>4} | {median['paged_join_ms']:>8.2f} ms {median['dense_join_ms']:>6.1f} ms | "
              f"{median['paged_leave_ms']:>9.2f} ms {median['dense_leave_ms']:>6.1f} ms | "
              f"{held['paged_mb']:>14,.0f} {held['dense_mb']:>7,.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "settings": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
