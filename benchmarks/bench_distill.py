"""Keep the answers (issue #20 item 3): cllm-global with the AR term against the distillation term, on
SmolLM2-135M-Instruct and GSM8K, drift measured three ways.

Two runs from the same trajectories, seed, steps and learning rate:
  ar       ``ar_weight`` 10, no distillation (the CLLM paper's recipe)
  distill  ``ar_weight`` 0, ``distill_weight`` 10: KL(frozen target || model) at the same answer positions
Then the target (HF greedy: the reference answers; plain Jacobi) and both trained models (plain Jacobi, block
16, batch 1) on GSM8K *test* prompts: Jacobi tokens per forward, and drift from the target's greedy answers
(:mod:`cllm_rt.demo.evaluate`): greedy agreement (difflib, and the exact-match rate), final-answer
agreement, and the target's perplexity on each model's outputs.

Everything runs in this one process at 1 thread, one stage after the other (the machine is shared):

    OMP_NUM_THREADS=1 python benchmarks/bench_distill.py --out runs/distill --prompts 40 --steps 24
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import bench_training  # noqa: E402  (benchmarks/ is the script's directory)
from bench_training import BLOCK_SIZE, MAX_NEW_TOKENS, MODEL, _log, load_examples  # noqa: E402

RUNS = {"ar": {"ar_weight": 10.0}, "distill": {"ar_weight": 0.0, "distill_weight": 10.0}}
BATCH_SIZE = 4
TARGET_METHODS, TRAINED_METHODS = ("target+hf", "target+jacobi"), ("cllm+jacobi",)


def stage_train(args) -> dict:
    from cllm_rt.training.train import TrainConfig, train

    timings = {}
    for name, options in RUNS.items():
        start = time.perf_counter()
        config = TrainConfig(objective="cllm-global", batch_size=BATCH_SIZE, lr=args.lr, seed=0,
                             max_steps=args.steps, warmup=max(1, args.steps // 10), save_every=args.steps, **options)
        train(MODEL, os.path.join(args.out, "trajectories"), os.path.join(args.out, name), config, progress=False,
              device="cpu")
        timings[name] = time.perf_counter() - start
        print(f"trained {name}: {timings[name]:.0f} s", flush=True)
    return timings


def stage_evaluate(args) -> None:
    from cllm_rt.demo import evaluate
    from cllm_rt.models import load_model

    target, tokenizer = load_model(MODEL, dtype="float32")
    examples = {"math": load_examples("math", "eval", args.eval_prompts, args.data_dir)}
    settings = evaluate.EvalSettings(block_size=BLOCK_SIZE)
    for name in ("target", *RUNS):
        models, methods = {"target": target}, TARGET_METHODS
        if name != "target":
            models["cllm"], _ = load_model(os.path.join(args.out, name), dtype="float32")
            methods = TRAINED_METHODS
        start = time.perf_counter()
        evaluate.evaluate(models, tokenizer, examples, {"math": MAX_NEW_TOKENS}, os.path.join(args.out, "eval", name),
                          settings, None, methods, progress=False)
        print(f"evaluated {name}: {time.perf_counter() - start:.0f} s", flush=True)


def report(args) -> dict:
    from cllm_rt.demo import data, evaluate
    from cllm_rt.models import resolve_model
    from transformers import AutoTokenizer

    from bench_decoding import machine

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(MODEL)))
    examples = {"math": load_examples("math", "eval", args.eval_prompts, args.data_dir)}
    records = {name: data.read_jsonl(os.path.join(args.out, "eval", name, "runs.jsonl")) for name in ("target", *RUNS)}
    keep = ("prompts", "tokens_per_forward", "non_loop_tokens_per_forward", "loop_share", "same", "greedy_agreement",
            "token_agreement", "answer_agreement", "accuracy", "target_perplexity")
    rows = {}
    for name in ("target", *RUNS):
        which = "target" if name == "target" else "cllm"
        extra = [] if name == "target" else records[name]
        summary = evaluate.summarize(records["target"] + extra, tokenizer, examples,
                                     methods=(f"{which}+jacobi",) + (("target+hf",) if name == "target" else ()))
        by_method = {row["method"]: row for row in summary}
        rows[name] = {k: by_method[f"{which}+jacobi"][k] for k in keep if k in by_method[f"{which}+jacobi"]}
        if name == "target":  # the reference answers themselves: perplexity of the target's own greedy output
            rows["target"]["hf_greedy_target_perplexity"] = by_method["target+hf"]["target_perplexity"]
    training = {}
    for name in RUNS:
        log = [e for e in _log(os.path.join(args.out, name)) if "loss" in e]
        training[name] = {"config": RUNS[name], "steps": len(log), "minutes": sum(e["seconds"] for e in log) / 60,
                          "first": {k: log[0][k] for k in ("loss", "consistency", "ar", "distill") if k in log[0]},
                          "last": {k: log[-1][k] for k in ("loss", "consistency", "ar", "distill") if k in log[-1]}}
    manifest = json.load(open(os.path.join(args.out, "trajectories", "manifest.json"), encoding="utf-8"))
    results = {
        "model": MODEL, "objective": "cllm-global", "block_size": BLOCK_SIZE, "max_new_tokens": MAX_NEW_TOKENS,
        "lr": args.lr, "batch_size": BATCH_SIZE, "steps": args.steps, "eval_prompts": len(examples["math"]),
        "trajectories": {"prompts": manifest["prompts_done"], "kept": manifest["prompts_kept"],
                         "blocks": sum(s["blocks"] for s in manifest["shards"])},
        "measures": {"greedy_agreement": "difflib ratio of the whole answer to the target's HF greedy answer "
                                         "(the training guard rail's measure), mean over prompts",
                     "same": "exact-match rate with the target's HF greedy answer",
                     "token_agreement": "per-position agreement over the first 64 tokens",
                     "answer_agreement": "same GSM8K final answer as the target's HF greedy answer",
                     "target_perplexity": "exp(summed NLL of the outputs under the target / output tokens)"},
        "training": training, "rows": rows,
        "machine": {**machine(), "description": args.machine, "torch_threads": 1},
        "note": f"small samples: {len(examples['math'])} test prompts, {manifest['prompts_kept']} training answers, "
                f"{args.steps} steps of batch {BATCH_SIZE}"}
    bench_training.save_results(args, "training-distill-smollm2-gsm8k", results, format_table(results))
    return results


def format_table(results: dict) -> str:
    lines = ["| model | Jacobi tok/fwd | greedy agreement (difflib) | same answer tokens | final-answer agreement | "
             "target perplexity on its outputs | accuracy |", "|---|---|---|---|---|---|---|"]
    for name, r in results["rows"].items():
        lines.append(f"| {name} | {r['tokens_per_forward']:.3f} | {r['greedy_agreement']:.2f} | {r['same']:.0%} | "
                     f"{r['answer_agreement']:.0%} | {r['target_perplexity']:.3f} | {r['accuracy']:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = bench_training.stage_parser(__doc__, "runs/distill")
    parser.add_argument("--prompts", type=int, default=40, help="GSM8K training prompts collected")
    parser.add_argument("--eval-prompts", type=int, default=16, help="GSM8K test prompts evaluated")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--machine", default="", help="a description of the machine for the JSON")
    # one process here: collect() runs it as a single rank
    bench_training.run_stages(parser.parse_args(), {"collect": bench_training.stage_collect, "train": stage_train,
                                                    "evaluate": stage_evaluate, "report": report})


if __name__ == "__main__":
    main()
