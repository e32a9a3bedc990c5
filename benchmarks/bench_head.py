"""The decoding head two ways: LM-head linear + jacobi_verify (logits materialized) vs the fused
lm_head_argmax + accepted_length, at 32k and 128k vocabularies (the choice behind
cllm_rt.ops.FUSED_HEAD_MIN_ROWS).

    python benchmarks/bench_head.py [--threads 2] [--json PATH]
"""

import argparse
import json
import random
import statistics
import time

import torch
import torch.nn.functional as F

from cllm_rt import ops


def variants(hidden, weight, block):
    def fused():
        greedy = ops.lm_head_argmax(hidden, weight)
        return greedy, ops.accepted_length(block, greedy)
    return {"linear + jacobi_verify": lambda: ops.jacobi_verify(F.linear(hidden, weight), block), "fused": fused}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(0)
    rows, d = [], 1024
    print(f"{'V':>7} {'dtype':<9}{'B':>3}{'n':>4}{'linear+verify ms':>18}{'fused ms':>10}{'speed-up':>10}")
    for vocab in (32000, 128256):
        for dtype in (torch.float32, torch.bfloat16):
            weight = (torch.randn(vocab, d) / d ** 0.5).to(dtype)
            for batch, n in ((1, 1), (1, 16), (8, 16)):
                hidden = torch.randn(batch, n, d).to(dtype)
                block = torch.randint(0, vocab, (batch, n))
                cases = variants(hidden, weight, block)
                times = {name: [] for name in cases}
                for round_ in range(args.rounds + 1):  # round 0 warms up
                    for name in random.sample(list(cases), len(cases)):
                        start = time.perf_counter()
                        cases[name]()
                        if round_:
                            times[name].append(1e3 * (time.perf_counter() - start))
                split, fused = (statistics.median(times[name]) for name in cases)
                rows.append(dict(vocab=vocab, dtype=str(dtype).removeprefix("torch."), batch=batch, n=n,
                                 linear_verify_ms=split, fused_ms=fused, speedup=split / fused))
                print(f"{vocab:>7} {rows[-1]['dtype']:<9}{batch:>3}{n:>4}{split:>18.2f}{fused:>10.2f}"
                      f"{split / fused:>9.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(threads=args.threads, d=d, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
