"""CLLM's objective against Jacobi Forcing's at equal wall-clock, on SmolLM2-135M-Instruct and GSM8K.

Stages (each resumes what an earlier, interrupted run left in --out):
  collect    Jacobi trajectories (block 16, float32) of GSM8K *training* prompts, under torchrun on 2
             processes of 1 thread each (``collect`` shards the prompts over processes).
  train      both objectives at once, each a process of 1 thread, so they share the machine alike and run
             the same minutes: each run's max_steps comes from its own first steps' timing (a pilot), and
             every checkpoint (a third of the steps) keeps a loadable model (``TrainConfig.keep_models``).
  evaluate   the target and every kept model on GSM8K *test* prompts, batch 1, 128 new tokens: cllm_rt
             plain Jacobi (block 16) and cllm_rt's best exact decoding (``drafts="auto"``); tokens/forward,
             loop share, accuracy, and drift from the target three ways (:mod:`cllm_rt.demo.evaluate`):
             greedy agreement (difflib), final-answer agreement, the target's perplexity on the outputs.
  report     results JSON, a markdown table and the curve (PNG).

    python benchmarks/bench_training.py --out runs/training --minutes 40   # ~2 hours on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # two 1-thread processes share 2 cores: no spinning

MODEL = "smollm2-135m-instruct"
OBJECTIVES = {  # objective -> micro-batch: cllm-* samples are blocks, jacobi-forcing's whole answers
    "cllm-global": 4,
    "jacobi-forcing": 2,
}
BLOCK_SIZE, MAX_NEW_TOKENS, LR = 16, 128, 1e-5
POINTS = 3  # checkpoints along training that are evaluated
TARGET_METHODS = ("target+hf", "target+jacobi", "target+best")  # HF greedy: the reference answers
TRAINED_METHODS = ("cllm+jacobi", "cllm+best")


def load_examples(domain: str, split: str, count: int, data_dir: str | None):
    """``count`` prompts of ``domain``'s ``split`` ("train", or "eval": held out): GSM8K's first ones (math),
    a seeded sample for Spider (sql), whose rows come grouped by database, so its first ones would be one
    database's questions, most of them twice in other words."""
    import random

    from cllm_rt.demo import data

    loaded = data.load_domain(domain, data_dir)
    chosen = loaded.train if split == "train" else loaded.eval
    if domain == "sql":
        chosen = random.Random(f"0:sql-{split}").sample(chosen, len(chosen))
    return chosen[:count]


def stage_collect(args, split: str = "train", domain: str = "math", block_size: int = BLOCK_SIZE) -> None:
    """Every process collects its share of the prompts of ``domain``'s ``split`` ("train", or "eval" for
    held-out trajectories): under torchrun as this file's collect stage (it re-launches itself), a single
    process when called directly (bench_distill, bench_curves)."""
    import torch

    from cllm_rt.demo.data import prompt_tokens
    from cllm_rt.models import load_model
    from cllm_rt.training.collect import CollectSettings, Prompt, collect
    from cllm_rt.training.distributed import torchrun_processes

    torch.set_num_threads(1)
    model, tokenizer = load_model(MODEL, dtype="float32")
    chosen = load_examples(domain, split, args.prompts, args.data_dir)
    prompts = [Prompt(prompt_tokens(tokenizer, ex)) for ex in chosen]
    settings = CollectSettings(block_size=block_size, max_new_tokens=MAX_NEW_TOKENS, shard_size=16)
    with torchrun_processes("cpu") as processes:
        start = time.perf_counter()
        manifest = collect(model, prompts, os.path.join(args.out, "trajectories"), settings, batch_size=8,
                           tokenizer=tokenizer, processes=processes, progress=processes.is_main)
        if processes.is_main:
            print(f"collect: {manifest['prompts_done']} prompts, {manifest['prompts_kept']} kept, "
                  f"{sum(s['blocks'] for s in manifest['shards'])} blocks, {time.perf_counter() - start:.0f} s")


def _log(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "log.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def stage_train(args) -> None:
    """One objective, in this process (1 thread): a pilot of a few steps times a step, then the timed run."""
    import torch

    from cllm_rt.training.train import TrainConfig, train

    torch.set_num_threads(1)
    objective = args.objective
    base = dict(objective=objective, batch_size=OBJECTIVES[objective], lr=LR, seed=0)
    pilot_dir = os.path.join(args.out, f"pilot-{objective}")
    train(MODEL, os.path.join(args.out, "trajectories"), pilot_dir,
          TrainConfig(**base, max_steps=4, save_every=10**6), progress=False, device="cpu")
    step_seconds = sorted(e["seconds"] for e in _log(pilot_dir)[1:])[1]  # the median of steps 2-4
    steps = max(POINTS, int(args.minutes * 60 / step_seconds) // POINTS * POINTS)
    run_dir = os.path.join(args.out, objective)
    print(f"{objective}: {step_seconds:.1f} s per step in the pilot -> {steps} steps for {args.minutes:g} minutes",
          flush=True)
    train(MODEL, os.path.join(args.out, "trajectories"), run_dir,
          TrainConfig(**base, max_steps=steps, warmup=max(1, steps // 10), save_every=steps // POINTS,
                      keep_models=True), progress=False, device="cpu")


def _checkpoints(out: str) -> list[tuple[str, str, int, float]]:
    """(name, model directory, step, training minutes so far) of every kept model, in order."""
    found = []
    for objective in OBJECTIVES:
        run_dir = os.path.join(out, objective)
        log = [e for e in _log(run_dir) if "loss" in e]
        for entry in log:
            if os.path.isdir(os.path.join(run_dir, f"step-{entry['step']}")):
                minutes = sum(e["seconds"] for e in log if e["step"] <= entry["step"]) / 60
                found.append((f"{objective}@{entry['step']}", os.path.join(run_dir, f"step-{entry['step']}"),
                              entry["step"], minutes))
    return found


def _eval_examples(args):
    return {"math": load_examples("math", "eval", args.eval_prompts, args.data_dir)}


def stage_evaluate(args) -> None:
    """Evaluate this worker's share of the models (of two shares balanced by the methods each model runs)."""
    import torch

    from cllm_rt.demo import evaluate
    from cllm_rt.models import load_model
    from cllm_rt.training.storage import load_trajectories

    torch.set_num_threads(1)
    target, tokenizer = load_model(MODEL, dtype="float32")
    answers = [p.answer for p in load_trajectories(os.path.join(args.out, "trajectories")).prompts]
    jobs = [("target", None)] + [(name, path) for name, path, _, _ in _checkpoints(args.out)]
    shares, load = ([], []), [0, 0]
    for name, path in jobs:  # each job to the share with fewer methods to run
        lighter = load.index(min(load))
        shares[lighter].append((name, path))
        load[lighter] += len(TARGET_METHODS if path is None else TRAINED_METHODS)
    settings = evaluate.EvalSettings(block_size=BLOCK_SIZE)
    for name, path in shares[args.share]:
        models, methods = {"target": target}, TARGET_METHODS
        if path is not None:
            models["cllm"], _ = load_model(path, dtype="float32")
            methods = TRAINED_METHODS
        evaluate.evaluate(models, tokenizer, _eval_examples(args), {"math": MAX_NEW_TOKENS},
                          os.path.join(args.out, "eval", name), settings, {"math": answers}, methods, progress=False)
        print(f"evaluated {name}", flush=True)


def report(args) -> dict:
    from cllm_rt.demo import data, evaluate
    from cllm_rt.demo.pipeline import machine_info, versions
    from cllm_rt.models import resolve_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(MODEL)))
    examples = _eval_examples(args)["math"]
    def runs(name: str) -> list[dict]:
        records = data.read_jsonl(os.path.join(args.out, "eval", name, "runs.jsonl"))
        expected = len(TARGET_METHODS if name == "target" else TRAINED_METHODS) * len(examples)
        if len(records) < expected:
            sys.exit(f"{name}: {len(records)} of {expected} runs evaluated; run --stage evaluate")
        return records

    target = runs("target")

    def decodings(which: str, records: list[dict]) -> dict:
        """Plain Jacobi and best decoding of one model, against the target's HF greedy answers."""
        rows = evaluate.summarize(target + records, tokenizer, {"math": examples},
                                  methods=(f"{which}+jacobi", f"{which}+best"))
        return {row["method"].split("+")[1]: row for row in rows}

    rows = [{"model": "target", "objective": None, "step": 0, "minutes": 0.0, **decodings("target", [])}]
    for name, _, step, minutes in _checkpoints(args.out):
        rows.append({"model": name, "objective": name.split("@")[0], "step": step, "minutes": minutes,
                     **decodings("cllm", runs(name))})
    training = {}
    for objective in OBJECTIVES:
        log = [e for e in _log(os.path.join(args.out, objective)) if "loss" in e][1:]  # the first step warms up
        median = lambda key: sorted(e[key] for e in log)[len(log) // 2]  # noqa: E731
        training[objective] = {"steps": len(log) + 1, "batch_size": OBJECTIVES[objective],
                               "minutes": sum(e["seconds"] for e in _log(os.path.join(args.out, objective))
                                              if "loss" in e) / 60,
                               "tokens_per_second": median("tokens_per_second"),
                               "blocks_per_second": median("blocks_per_second"),
                               "blocks": sum(e["blocks"] for e in log), "final_loss": log[-1]["loss"]}
    manifest = json.load(open(os.path.join(args.out, "trajectories", "manifest.json"), encoding="utf-8"))
    results = {"model": MODEL, "block_size": BLOCK_SIZE, "max_new_tokens": MAX_NEW_TOKENS, "lr": LR,
               "minutes_per_objective": args.minutes, "eval_prompts": len(examples),
               "trajectories": {"prompts": manifest["prompts_done"], "kept": manifest["prompts_kept"],
                                "blocks": sum(s["blocks"] for s in manifest["shards"])},
               "training": training, "rows": rows, "machine": machine_info(1), "versions": versions()}
    save_results(args, "training-smollm2-gsm8k", results, format_table(results))
    _plot(rows, os.path.join(args.results, "training-smollm2-gsm8k.png"))
    return results


def save_results(args, name: str, results: dict, table: str) -> None:
    """``results`` as ``args.results/NAME.json``, and the table printed (every staged benchmark's report)."""
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    print(table)
    print(f"results: {path}")


def pyplot():
    """matplotlib's pyplot drawing to files, or None where matplotlib (not a dependency) is not installed."""
    try:
        import matplotlib
    except ImportError:  # the JSON holds every number of the picture
        print("matplotlib is not installed: no PNG")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def format_table(results: dict) -> str:
    lines = ["| model | train min | tok/fwd Jacobi (non-loop) | tok/fwd best (non-loop) | loop share | "
             "token agreement (first 64) | greedy agreement (difflib) | same answer tokens | final-answer agreement | "
             "target ppl | accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    number = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    for r in results["rows"]:
        j, b = r["jacobi"], r["best"]
        lines.append(f"| {r['model']} | {r['minutes']:.1f} | {j['tokens_per_forward']:.2f} "
                     f"({number(j['non_loop_tokens_per_forward'])}) | {b['tokens_per_forward']:.2f} "
                     f"({number(b['non_loop_tokens_per_forward'])}) | {j['loop_share']:.0%} | "
                     f"{j['token_agreement']:.0%} | {number(j.get('greedy_agreement'))} | {j['same']:.0%} | "
                     f"{j['answer_agreement']:.0%} | {number(j.get('target_perplexity'))} | {j['accuracy']:.0%} |")
    lines += ["", "| objective | steps | batch | minutes | tokens/s | blocks/s | blocks seen |", "|---|---|---|---|---|---|---|"]
    for objective, t in results["training"].items():
        lines.append(f"| {objective} | {t['steps']} | {t['batch_size']} | {t['minutes']:.1f} | "
                     f"{t['tokens_per_second']:.0f} | {t['blocks_per_second']:.2f} | {t['blocks']} |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    target = rows[0]
    for objective, color in zip(OBJECTIVES, ("tab:blue", "tab:orange")):
        curve = [target] + [r for r in rows if r["objective"] == objective]
        minutes = [r["minutes"] for r in curve]
        axes[0].plot(minutes, [r["jacobi"]["tokens_per_forward"] for r in curve], "o-", color=color,
                     label=f"{objective}, plain Jacobi")
        axes[0].plot(minutes, [r["best"]["tokens_per_forward"] for r in curve], "s--", color=color,
                     label=f"{objective}, best exact decoding")
        axes[1].plot(minutes, [r["jacobi"]["answer_agreement"] for r in curve], "o-", color=color,
                     label=f"{objective}: answer agreement")
        axes[1].plot(minutes, [r["jacobi"]["token_agreement"] for r in curve], "^--", color=color,
                     label=f"{objective}: token agreement (first 64)")
        axes[1].plot(minutes, [r["jacobi"]["accuracy"] for r in curve], "s:", color=color,
                     label=f"{objective}: GSM8K accuracy")
    axes[0].set(xlabel="training minutes (1 thread)", ylabel="held-out tokens per forward", title="Speed")
    axes[1].set(xlabel="training minutes (1 thread)", ylabel="share of held-out prompts", ylim=(0, 1.05),
                title="Quality (vs the target's greedy answers)")
    for ax in axes:
        ax.legend(fontsize=7)
    save_figure(plt, fig, f"SmolLM2-135M-Instruct, GSM8K, block {BLOCK_SIZE}: CLLM vs Jacobi Forcing at equal minutes",
                path)


def save_figure(plt, fig, title: str, path: str) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"curve: {path}")


def _parallel(args, worker: str, extra: list[list[str]]) -> None:
    """Run two 1-thread workers of this script at once; fail if either fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--worker", worker, *e], env=env)
             for e in extra]
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"{worker}: a worker failed (exit codes {codes})")


STAGES = ("collect", "train", "evaluate", "report")


def stage_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The arguments of a staged consistency-training benchmark (this one, bench_distill.py, bench_curves.py):
    where its runs go, which stage to run, the data and where the JSON and the PNG go."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--out", default=out)
    parser.add_argument("--stage", choices=("all",) + STAGES, default="all")
    parser.add_argument("--data-dir", help="holds gsm8k/ and spider/ (default: ../shared/data)")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                        help="where the JSON and the PNG go")
    return parser


def run_stages(args, stages: dict) -> None:
    """Run, in this process at 1 thread, the stage ``args.stage`` names, or every one in STAGES order."""
    import torch

    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    for name in STAGES:
        if args.stage in ("all", name):
            stages[name](args)


def main() -> None:
    parser = stage_parser(__doc__, "runs/training")
    parser.add_argument("--prompts", type=int, default=192, help="GSM8K training prompts collected")
    parser.add_argument("--eval-prompts", type=int, default=16, help="GSM8K test prompts evaluated")
    parser.add_argument("--minutes", type=float, default=40.0, help="training minutes per objective")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--objective", help=argparse.SUPPRESS)
    parser.add_argument("--share", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return {"collect": stage_collect, "train": stage_train, "evaluate": stage_evaluate}[args.worker](args)
    os.makedirs(args.out, exist_ok=True)
    if args.stage in ("all", "collect"):
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        __file__, "--worker", "collect", *sys.argv[1:]], check=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))

    if args.stage in ("all", "train"):
        _parallel(args, "train", [["--objective", objective] for objective in OBJECTIVES])
    if args.stage in ("all", "evaluate"):
        _parallel(args, "evaluate", [["--share", "0"], ["--share", "1"]])
    if args.stage in ("all", "report"):
        report(args)


if __name__ == "__main__":
    main()
