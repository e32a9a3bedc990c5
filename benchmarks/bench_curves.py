"""Is consistency training learning here? (issue #20 item 1): curves against blocks seen, on training and
held-out prompts, for SmolLM2-135M-Instruct, cllm-global, on GSM8K (--domain math) or Spider (--domain sql) at
--block-size (16 by default).

Two measures at the target (step 0) and at every kept checkpoint, on the training prompts' trajectories and on
held-out prompts' trajectories (GSM8K *test*; Spider's held-out databases), each collected from the target with
the same settings:
  one-step   one forward over context + a recorded non-final Jacobi state y^(j) of a block; position i is right
             when the model's argmax there (its guess for token i given y^(j)_{<i}) equals the fixed point y*_i.
             Reported over all positions, and over the positions beyond the state's converged prefix (the
             longest prefix of y^(j) already equal to y*): only those positions can shorten Jacobi, since the
             prefix is right by construction (a causal model gives y*_i whenever y^(j)_{<i} = y*_{<i}).
  jacobi     tokens per forward of plain Jacobi decoding (--block-size, no drafts, 128 new tokens, batch 1) on
             a few prompts of the split.
Learning shows as rising curves on both splits; memorising as a rising train curve over a flat
held-out one.

Stages, one process at 1 thread (the machine is shared), each reading what the earlier left in --out:
  collect    held-out trajectories, and the training prompts' unless --train-trajectories names them, through
             bench_training's collect stage (in this process, so one process)
  train      cllm-global from the training trajectories, batch 4 blocks, every --save-every steps a loadable model
  evaluate   both measures for the target and every checkpoint, both splits
  report     results JSON (and the PNG when matplotlib is installed)

    OMP_NUM_THREADS=1 python benchmarks/bench_curves.py --out /tmp/curves \
        --train-trajectories runs/distill/trajectories --steps 64 --save-every 16
    OMP_NUM_THREADS=1 python benchmarks/bench_curves.py --out /tmp/curves-sql --domain sql --steps 64 --save-every 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import bench_training  # noqa: E402  (benchmarks/ is the script's directory)
from bench_training import BLOCK_SIZE, MAX_NEW_TOKENS, MODEL, _log  # noqa: E402

OBJECTIVE, BATCH_SIZE = "cllm-global", 4
DATA = {  # --domain -> (the data's name, in file names and titles; what the training and held-out prompts are)
    "math": ("GSM8K", "GSM8K train", "GSM8K test"),
    "sql": ("Spider", "Spider dev, training databases", "Spider dev, held-out databases"),
}


def stage_train(args) -> None:
    from cllm_rt.training.train import TrainConfig, train

    config = TrainConfig(objective=OBJECTIVE, batch_size=BATCH_SIZE, lr=args.lr, seed=0, max_steps=args.steps,
                         warmup=max(1, args.steps // 10), save_every=args.save_every, keep_models=True,
                         train_layers=args.train_layers)
    start = time.perf_counter()
    train(MODEL, _splits(args)["train"], os.path.join(args.out, OBJECTIVE), config, progress=False, device="cpu")
    print(f"trained {OBJECTIVE}: {args.steps} steps, {time.perf_counter() - start:.0f} s", flush=True)


def stage_collect(args) -> None:
    """The target's Jacobi trajectories of the held-out prompts, and of the training prompts unless
    --train-trajectories names them, both with the same settings (domain, block size)."""
    splits = {"heldout": ("eval", args.prompts)}
    if not args.train_trajectories:
        splits["train"] = ("train", args.train_prompts)
    for name, (split, count) in splits.items():
        bench_training.stage_collect(argparse.Namespace(out=os.path.join(args.out, name), prompts=count,
                                                        data_dir=args.data_dir),
                                     split=split, domain=args.domain, block_size=args.block_size)


def _splits(args) -> dict[str, str]:
    train = args.train_trajectories or os.path.join(args.out, "train", "trajectories")
    return {"train": train, "heldout": os.path.join(args.out, "heldout", "trajectories")}


def _models(args) -> list[tuple[str, str | None, int]]:
    """(name, model directory or None for the target, step) of the target and every kept checkpoint."""
    run_dir = os.path.join(args.out, OBJECTIVE)
    steps = sorted(e["step"] for e in _log(run_dir) if "loss" in e
                   and os.path.isdir(os.path.join(run_dir, f"step-{e['step']}")))
    return [("target", None, 0)] + [(f"{OBJECTIVE}@{s}", os.path.join(run_dir, f"step-{s}"), s) for s in steps]


def _chosen_states(trajectories, cap: int) -> list[tuple]:
    """(prompt, block) pairs, in a seeded random order of blocks, until their non-final states reach ``cap``:
    the same states at every checkpoint, spread over prompts, each block's context forwarded once."""
    import random

    blocks = [(p, b) for p in trajectories.prompts for b in p.blocks if len(b.states) > 1]
    random.Random(0).shuffle(blocks)
    chosen, states = [], 0
    for p, b in blocks:
        if states >= cap:
            break
        chosen.append((p, b))
        states += len(b.states) - 1
    return chosen


def one_step(model, chosen) -> dict:
    """One forward from every non-final recorded state y^(j): which block positions the argmax gets right.

    The context's keys/values are computed once per block and repeated over its states (the states differ only
    inside the block). Position i's prediction is the logit row before it: the context's last row for i = 0.
    Only positions before the fixed point's end (``valid``, its first EOS included) count.
    """
    import torch

    totals = dict(states=0, positions=0, right=0, beyond_positions=0, beyond_right=0, gained=0)
    with torch.inference_mode():
        for prompt, block in chosen:
            fixed, states, valid = block.states[-1], block.states[:-1], block.valid
            context = torch.tensor([prompt.context(block)])
            out = model(context, use_cache=True)
            cache = out.past_key_values
            cache.batch_repeat_interleave(len(states))
            logits = model(torch.tensor(states), past_key_values=cache).logits  # [K, n, V]
            first = out.logits[0, -1].argmax(-1).expand(len(states), 1)
            guess = torch.cat([first, logits[:, :-1].argmax(-1)], dim=1)[:, :valid]  # [K, valid]
            target = torch.tensor(fixed[:valid])
            right = guess == target
            for k, state in enumerate(states):
                converged = next((i for i in range(valid) if state[i] != fixed[i]), valid)
                if converged >= valid:  # differs from y* only after its EOS: nothing left to fix
                    continue
                # position `converged` is right for the target by construction (its prefix is y*'s); only the
                # positions after it can make Jacobi take more than one token per forward
                beyond = right[k, converged + 1:]
                # the prefix is final already (Jacobi never recomputes it): this forward fixes the run of right
                # guesses that starts at `converged` (1 at least for the target, more when guesses land)
                gained = int(right[k, converged:].long().cumprod(0).sum())
                totals["states"] += 1
                totals["positions"] += valid
                totals["right"] += int(right[k].sum())
                totals["beyond_positions"] += beyond.numel()
                totals["beyond_right"] += int(beyond.sum())
                totals["gained"] += gained
    return {**totals, "fraction_right": totals["right"] / totals["positions"],
            "fraction_right_beyond": totals["beyond_right"] / max(1, totals["beyond_positions"]),
            "tokens_gained_per_forward": totals["gained"] / totals["states"]}


def jacobi(model, prompts: list[list[int]], block_size: int) -> dict:
    """Plain Jacobi decoding (no drafts, batch 1): tokens made final per decode forward, pooled."""
    import torch

    from cllm_rt import generate

    tokens = steps = 0
    for prompt in prompts:
        histogram = generate(model, torch.tensor([prompt]), max_new_tokens=MAX_NEW_TOKENS, block_size=block_size,
                             drafts=None).stats.accepted_histogram  # [k] = forwards that made k tokens final
        tokens += sum(k * c for k, c in enumerate(histogram))
        steps += sum(histogram)
    return {"prompts": len(prompts), "tokens": tokens, "forwards": steps, "tokens_per_forward": tokens / steps}


def stage_evaluate(args) -> None:
    """Both measures for every model on both splits; each model's numbers in out/eval/<name>.json (a rerun
    skips the models already measured)."""
    from cllm_rt.models import load_model
    from cllm_rt.training.storage import load_trajectories

    splits = {name: load_trajectories(path) for name, path in _splits(args).items()}
    for name, trajectories in splits.items():  # the one-step measure reads the recorded states' block size
        if trajectories.block_size != args.block_size:
            sys.exit(f"the {name} trajectories are of block {trajectories.block_size}, not --block-size "
                     f"{args.block_size}")
    chosen = {name: _chosen_states(t, args.states) for name, t in splits.items()}
    prompts = {name: [p.prompt for p in t.prompts[:args.jacobi_prompts]] for name, t in splits.items()}
    os.makedirs(os.path.join(args.out, "eval"), exist_ok=True)
    for name, path, step in _models(args):
        result_path = os.path.join(args.out, "eval", f"{name}.json")
        if os.path.exists(result_path):
            continue
        model, _ = load_model(MODEL if path is None else path, dtype="float32")
        result = {"model": name, "step": step}
        for split in splits:
            start = time.perf_counter()
            result[split] = {"one_step": one_step(model, chosen[split])}
            middle = time.perf_counter()
            result[split]["jacobi"] = jacobi(model, prompts[split], args.block_size)
            result[split]["seconds"] = {"one_step": middle - start, "jacobi": time.perf_counter() - middle}
        with open(result_path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        print(f"{name}: " + ", ".join(f"{s} {result[s]['one_step']['fraction_right']:.3f} right, "
                                      f"{result[s]['one_step']['fraction_right_beyond']:.3f} beyond, "
                                      f"{result[s]['jacobi']['tokens_per_forward']:.3f} tok/fwd" for s in splits),
              flush=True)


MEASURES = (("one_step", "fraction_right"), ("one_step", "fraction_right_beyond"),
            ("one_step", "tokens_gained_per_forward"), ("jacobi", "tokens_per_forward"))


def extrapolate(blocks: list[int], values: list[float], goal: float) -> dict:
    """Blocks seen until ``values`` reach ``goal``, by two least-squares fits of the measured points: linear in
    blocks (every point, the target at 0), and linear in log(blocks) (the checkpoints only: log 0 is undefined).
    None where a fit's slope is not positive (no improvement to extend)."""
    import math

    def fit(xs, ys):
        n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if n > 1 and sxx else 0.0
        return my - slope * mx, slope

    a, b = fit(blocks, values)
    linear = (goal - a) / b if b > 0 else None
    later = [(x, y) for x, y in zip(blocks, values) if x > 0]
    la, lb = fit([math.log(x) for x, _ in later], [y for _, y in later]) if len(later) > 1 else (0.0, 0.0)
    log_linear = math.exp(min(700.0, (goal - la) / lb)) if lb > 0 else None
    return {"goal": goal, "linear": {"intercept": a, "slope_per_block": b, "blocks": linear},
            "log_linear": {"intercept": la, "slope_per_log_block": lb, "blocks": log_linear}}


def results_name(args) -> str:
    """curves-smollm2-<data>-b<block size>[-top<N>]; GSM8K at block 16 keeps its first name, curves-smollm2-gsm8k
    (-top<N>: --train-layers N)."""
    name = f"curves-smollm2-{DATA[args.domain][0].lower()}"
    name = name if (args.domain, args.block_size) == ("math", 16) else f"{name}-b{args.block_size}"
    return f"{name}-top{args.train_layers}" if args.train_layers else name


def report(args) -> dict:
    from bench_decoding import machine

    from cllm_rt.demo.data import load_domain

    rows = []
    for name, _, step in _models(args):
        path = os.path.join(args.out, "eval", f"{name}.json")
        if not os.path.exists(path):
            print(f"{name}: not evaluated yet; run --stage evaluate")
            continue
        with open(path, encoding="utf-8") as f:
            rows.append({**json.load(f), "blocks_seen": step * BATCH_SIZE})
    log = [e for e in _log(os.path.join(args.out, OBJECTIVE)) if "loss" in e]
    timed = log[1:]  # the first step warms up
    blocks_per_second = sorted(e["blocks_per_second"] for e in timed)[len(timed) // 2]
    target_tpf = rows[0]["heldout"]["jacobi"]["tokens_per_forward"]
    fits = {}
    for split in ("train", "heldout"):
        for measure, key in (("jacobi", "tokens_per_forward"), ("one_step", "tokens_gained_per_forward")):
            # 2x the target's plain-Jacobi speed; the one-step gain is in the same unit (tokens per forward)
            fit = extrapolate([r["blocks_seen"] for r in rows], [r[split][measure][key] for r in rows],
                              2 * rows[0][split][measure][key])
            for kind in ("linear", "log_linear"):
                blocks = fit[kind]["blocks"]
                fit[kind]["cpu_hours"] = None if blocks is None else blocks / blocks_per_second / 3600
            fits[f"{split}/{measure}.{key}"] = fit
    manifests = {split: json.load(open(os.path.join(path, "manifest.json"), encoding="utf-8"))
                 for split, path in _splits(args).items()}
    results = {
        "model": MODEL, "objective": OBJECTIVE, "dtype": "float32", "domain": args.domain,
        "data": DATA[args.domain][0], "split": load_domain(args.domain, args.data_dir).split,
        "block_size": args.block_size,
        "max_new_tokens": MAX_NEW_TOKENS, "lr": args.lr, "batch_size": BATCH_SIZE, "warmup": max(1, args.steps // 10),
        "train_layers": args.train_layers,
        "steps": len(log), "blocks_seen": len(log) * BATCH_SIZE,
        "trajectories": {split: {"prompts": m["prompts_kept"], "blocks": sum(s["blocks"] for s in m["shards"]),
                                 "data": DATA[args.domain][1 if split == "train" else 2]}
                         for split, m in manifests.items()},
        "training": {"minutes": sum(e["seconds"] for e in log) / 60, "blocks_per_second": blocks_per_second,
                     "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"]},
        "measures": {
            "fraction_right": "over recorded non-final states y^(j) and block positions i before the fixed "
                              "point's end: argmax given context + y^(j)_{<i} equals the fixed point y*_i",
            "fraction_right_beyond": "the same, only at positions after the state's converged prefix and after "
                                     "the one position the prefix makes right by construction",
            "tokens_gained_per_forward": "mean over states of the run of right guesses starting at the end of the "
                                         "state's converged prefix: tokens one Jacobi iteration fixes from it",
            "tokens_per_forward": f"plain Jacobi decoding (block {args.block_size}, no drafts, batch 1, "
                                  f"{MAX_NEW_TOKENS} new tokens), tokens made final per decode forward pooled over "
                                  "the split's first prompts"},
        "target_heldout_jacobi_tokens_per_forward": target_tpf,
        "extrapolation": fits,
        "extrapolation_note": "least-squares fits of a short run's few points, extended far beyond them; the "
                              "fits ignore epochs (the training set is small) and learning-rate decay",
        "rows": rows, "machine": {**machine(), "description": args.machine, "torch_threads": 1}}
    bench_training.save_results(args, results_name(args), results, format_table(results))
    _plot(results, os.path.join(args.results, f"{results_name(args)}.png"))
    return results


def format_table(results: dict) -> str:
    lines = ["| model | blocks seen | split | one-step right | right beyond prefix | tokens fixed per iteration "
             "(recorded states) | Jacobi tok/fwd |", "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        for split in ("train", "heldout"):
            o, j = r[split]["one_step"], r[split]["jacobi"]
            lines.append(f"| {r['model']} | {r['blocks_seen']} | {split} | {o['fraction_right']:.3f} | "
                         f"{o['fraction_right_beyond']:.3f} | {o['tokens_gained_per_forward']:.3f} | "
                         f"{j['tokens_per_forward']:.3f} |")
    lines += ["", "| curve (to 2x its step-0 value) | linear fit: blocks | CPU hours | log-linear fit: blocks | "
              "CPU hours |", "|---|---|---|---|---|"]
    number = lambda x: "no gain" if x is None else f"{x:.3g}"  # noqa: E731
    for name, fit in results["extrapolation"].items():
        lines.append(f"| {name} | {number(fit['linear']['blocks'])} | {number(fit['linear']['cpu_hours'])} | "
                     f"{number(fit['log_linear']['blocks'])} | {number(fit['log_linear']['cpu_hours'])} |")
    return "\n".join(lines)


def _plot(results: dict, path: str) -> None:
    plt = bench_training.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(4 * len(MEASURES), 3.6))
    blocks = [r["blocks_seen"] for r in results["rows"]]
    for ax, (measure, key) in zip(axes, MEASURES):
        for split, style in (("train", "o-"), ("heldout", "s--")):
            ax.plot(blocks, [r[split][measure][key] for r in results["rows"]], style, label=split)
        ax.set(xlabel="blocks seen", title=key.replace("_", " "))
        ax.legend(fontsize=7)
    bench_training.save_figure(plt, fig, f"SmolLM2-135M-Instruct, {results['data']}, block {results['block_size']}, "
                                         f"{OBJECTIVE}", path)


def main() -> None:
    parser = bench_training.stage_parser(__doc__, "runs/curves")
    parser.add_argument("--domain", choices=tuple(DATA), default="math", help="math: GSM8K; sql: Spider")
    parser.add_argument("--block-size", type=int, default=BLOCK_SIZE,
                        help="of the collected trajectories and of Jacobi decoding")
    parser.add_argument("--train-trajectories",
                        help="trajectories of the domain's training prompts at --block-size (bench_training / "
                             "bench_distill collect); default: the collect stage collects --train-prompts of them")
    parser.add_argument("--train-prompts", type=int, default=40, help="training prompts collected")
    parser.add_argument("--prompts", type=int, default=12, help="held-out prompts collected")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--save-every", type=int, default=16, help="steps between evaluated checkpoints")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--train-layers", type=int, default=0,
                        help="train only the top N decoder layers and the final norm (0: every parameter)")
    parser.add_argument("--states", type=int, default=200, help="recorded states measured per split, at most")
    parser.add_argument("--jacobi-prompts", type=int, default=6, help="prompts decoded per split and checkpoint")
    parser.add_argument("--machine", default="", help="a description of the machine for the JSON")
    bench_training.run_stages(parser.parse_args(), {"collect": stage_collect, "train": stage_train,
                                                    "evaluate": stage_evaluate, "report": report})


if __name__ == "__main__":
    main()
