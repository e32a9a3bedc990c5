"""Do trained checkpoints keep the target's answers, and what do they gain? (issue #20's answer and speed targets)

Each checkpoint (``--checkpoint NAME=DIR``, e.g. bench_curves' kept steps) beside its target,
SmolLM2-135M-Instruct, on held-out prompts of the domain (GSM8K test; Spider's held-out databases), at
``--max-new-tokens``, batch 1, float32, through ``cllm_rt.demo.evaluate``: the target with HF greedy (the
reference answers) and with cllm_rt's default decoding, and each checkpoint with the same decoding, interleaved
per prompt in one run. Every default-decoding run drafts from its own corpus, seeded with the target's answers
to the training prompts (``--trajectories``, as the demo seeds it). Reports, per model: tokens/s and its ratio to
the target's with the same decoding (training's own effect), tokens per forward, final-answer (GSM8K) or SQL
agreement with the target, the loop share, and the target's perplexity on the outputs.

    python benchmarks/bench_drift.py --trajectories /tmp/curves/train/trajectories \\
        --checkpoint full@64=/tmp/curves/cllm-global/step-64 --checkpoint top6@64=/tmp/curves-top6/cllm-global/step-64 \\
        --out /tmp/drift --json benchmarks/results/drift-smollm2-gsm8k.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import bench_training  # noqa: E402  (benchmarks/ is the script's directory)
from bench_decoding import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", required=True, metavar="NAME=DIR",
                        help="a trained model directory and the name its rows get (repeatable)")
    parser.add_argument("--trajectories", required=True, help="the training prompts' trajectories: the corpus seed")
    parser.add_argument("--domain", choices=("math", "sql"), default="math")
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=None, help="holds gsm8k/ and spider/ (default: ../shared/data)")
    parser.add_argument("--out", required=True, help="run records (an interrupted run resumes from them)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    if any(name in ("target", "") or "+" in name for name in checkpoints):
        parser.error("a checkpoint's NAME must be non-empty, not 'target', and without '+'")

    from cllm_rt.demo import evaluate
    from cllm_rt.models import load_model
    from cllm_rt.training.storage import load_trajectories

    torch.set_num_threads(args.threads)
    target, tokenizer = load_model(bench_training.MODEL, dtype="float32")
    models = {"target": target, **{name: load_model(path, dtype="float32")[0] for name, path in checkpoints.items()}}
    methods = ("target+hf", "target+best", *(f"{name}+best" for name in checkpoints))
    examples = {args.domain: bench_training.load_examples(args.domain, "eval", args.prompts, args.data_dir)}
    seed = {args.domain: [p.answer for p in load_trajectories(args.trajectories).prompts]}
    records = evaluate.evaluate(models, tokenizer, examples, {args.domain: args.max_new_tokens}, args.out,
                                corpus_seed=seed, methods=methods)
    rows = evaluate.summarize(records, tokenizer, examples, methods)
    own = next(r["tokens_per_second"] for r in rows if r["method"] == "target+best")
    for row in rows:
        row["vs_target_same_decoding"] = row["tokens_per_second"] / own
    print(evaluate.format_table(rows))
    for row in rows:
        print(f"{row['method']}: {row['vs_target_same_decoding']:.2f}x the target's default decoding, "
              f"target perplexity {row.get('target_perplexity', float('nan')):.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": bench_training.MODEL, "checkpoints": checkpoints, "domain": args.domain,
                       "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "rows": rows,
                       "machine": machine()}, f, indent=1)


if __name__ == "__main__":
    main()
