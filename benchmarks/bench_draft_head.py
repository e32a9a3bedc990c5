"""A draft head's end-to-end effect on SmolLM2-135M-Instruct: held-out GSM8K test prompts (--domain sql: Spider's
held-out databases; chat template), batch 1, float32, one interleaved run (methods shuffled per prompt): HF
greedy, HF prompt lookup (10 tokens), cllm_rt's default decoding on the target, and the same on the target with
its draft head attached (a directory written by benchmarks/train_draft_head.py or `cllm-rt train-head`), once per
``--branches`` value (the head's first guesses per step). Reports tokens/s, tokens per forward, and whether every
method's output equals HF greedy's.

    OMP_NUM_THREADS=1 flock /tmp/bench.lock python benchmarks/bench_draft_head.py --head-model DIR [--json PATH]
"""

import argparse
import functools
import json
import os
import random
import time

import torch

import cllm_rt
from bench_decoding import machine
from cllm_rt import draft_head
from cllm_rt.demo.data import load_domain, prompt_tokens
from cllm_rt.models import load_model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--domain", default="math", choices=["math", "sql"],
                        help="GSM8K (train / test split) or Spider (held-out databases)")
    parser.add_argument("--head-model", required=True)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--skip", type=int, default=16, help="held-out prompts used by the offline measurement")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--data-dir", default=os.environ.get("CLLM_RT_DATA"))
    parser.add_argument("--branches", type=int, nargs="+", default=[1, 2],
                        help="the head's first guesses per step, one method each")
    parser.add_argument("--json")
    args = parser.parse_args()
    target, tokenizer = load_model(args.model, dtype=torch.float32)
    # one copy of the model per --branches value: what decoding learns about a model (its corpus of earlier
    # outputs, draft calibration, step costs) must not carry one method's answers into another's drafts
    headed = {b: load_model(args.head_model, dtype=torch.float32)[0] for b in args.branches}
    for b, model in headed.items():
        if draft_head.attached(model) is None:
            raise SystemExit(f"{args.head_model} has no draft head")
        draft_head.attached(model).branches = b
    head = draft_head.attached(headed[args.branches[0]])
    held_out = load_domain(args.domain, args.data_dir).eval
    examples = held_out[args.skip:args.skip + args.prompts + 1]  # the first one warms up
    new = args.max_new_tokens
    methods = {
        "hf_greedy": lambda ids: (target.generate(ids, do_sample=False, max_new_tokens=new), None),
        "hf_prompt_lookup": lambda ids: (target.generate(ids, do_sample=False, max_new_tokens=new,
                                                         prompt_lookup_num_tokens=10), None),
        "cllm_rt_target": lambda ids: _cllm(target, ids, new),
        **{f"cllm_rt_target_with_head_{b}_branches": functools.partial(_cllm, headed[b], new=new)
           for b in args.branches},
    }
    rng = random.Random(0)
    totals = {m: {"seconds": 0.0, "tokens": 0, "forwards": 0} for m in methods}
    same = {m: 0 for m in methods}
    with_head = [m for m in methods if m.startswith("cllm_rt_target_with_head")]
    head_accepted, head_proposed = dict.fromkeys(with_head, 0), dict.fromkeys(with_head, 0)
    for i, example in enumerate(examples):
        ids = torch.tensor([prompt_tokens(tokenizer, example)])
        order = list(methods)
        rng.shuffle(order)
        outputs = {}
        for name in order:
            start = time.perf_counter()
            sequences, stats = methods[name](ids)
            seconds = time.perf_counter() - start
            outputs[name] = sequences[0, ids.shape[1]:].tolist()
            if i == 0:
                continue
            totals[name]["seconds"] += seconds
            totals[name]["tokens"] += len(outputs[name])
            if stats is not None:
                totals[name]["forwards"] += stats.forward_passes
                if name in with_head:
                    head_accepted[name] += stats.accepted_by_source["head"]
                    head_proposed[name] += stats.proposed_by_source["head"]
        if i:
            for name in methods:
                same[name] += outputs[name] == outputs["hf_greedy"]
            print(f"prompt {i}: {len(outputs['hf_greedy'])} tokens, "
                  + ", ".join(f"{n} {'same' if outputs[n] == outputs['hf_greedy'] else 'DIFFERENT'}" for n in order),
                  flush=True)
    rows = {}
    for name, t in totals.items():
        rows[name] = {"tokens_per_s": t["tokens"] / t["seconds"], "tokens": t["tokens"], "seconds": t["seconds"],
                      "tokens_per_forward": t["tokens"] / t["forwards"] if t["forwards"] else None,
                      "same_as_hf_greedy": f"{same[name]}/{len(examples) - 1}"}
    base = rows["hf_greedy"]["tokens_per_s"]
    print(f"{'method':40} {'tok/s':>7} {'x HF':>6} {'tok/fwd':>7} same")
    for name, r in rows.items():
        tpf = "" if r["tokens_per_forward"] is None else f"{r['tokens_per_forward']:.2f}"
        print(f"{name:40} {r['tokens_per_s']:7.2f} {r['tokens_per_s'] / base:6.2f} {tpf:>7} {r['same_as_hf_greedy']}")
    result = {"rows": rows, "head": draft_head.describe(head),
              "head_accepted": head_accepted, "head_proposed": head_proposed,
              "prompts": len(examples) - 1, "max_new_tokens": new,
              "machine": machine()["cpu"], "threads": torch.get_num_threads(), "load_average_after": os.getloadavg(),
              "conditions": "float32, batch 1, one interleaved run"}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def _cllm(model, ids, new):
    out = cllm_rt.generate(model, ids, max_new_tokens=new)
    return out.sequences, out.stats


if __name__ == "__main__":
    main()
