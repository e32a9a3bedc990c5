"""Train a draft head (cllm_rt.draft_head) for SmolLM2-135M-Instruct on GSM8K train prompts and measure it offline
on held-out GSM8K test prompts (--domain sql: prompts of Spider's training databases, scored on its held-out
databases); write the target + head as a model directory that load_model attaches it from.

Labels are the target's own greedy answers (cllm_rt's exact decoding, batched), plus the stretches of the dataset's reference
answers that the target agrees with. Offline metric: per depth, the share of held-out positions the head
guesses right, and the mean count of leading right guesses (tokens a head chain adds per step).

    OMP_NUM_THREADS=1 flock /tmp/bench.lock python benchmarks/train_draft_head.py --out DIR [--json PATH]
"""

import argparse
import json
import os
import time

import torch

from cllm_rt import draft_head
from cllm_rt.demo.data import load_domain, prompt_tokens, reference_tokens
from cllm_rt.models import load_model
from cllm_rt.training.draft_head import fit_head, greedy_answers, head_accuracy, head_examples


def features(model, tokenizer, args, start):
    """(hidden states, roots, labels) of the target's own greedy answers (train and held-out) and of the reference
    answers' stretches it agrees with (train)."""
    data = load_domain(args.domain, os.environ.get("CLLM_RT_DATA"))
    train, held = data.train[:args.train_prompts], data.eval[:args.eval_prompts]
    prompts = [prompt_tokens(tokenizer, e) for e in train + held]
    answers = greedy_answers(model, prompts, args.max_new_tokens, {tokenizer.eos_token_id})
    gen_s = time.perf_counter() - start
    print(f"greedy answers: {len(answers)} in {gen_s:.0f} s", flush=True)
    own = [(p + a, len(p)) for p, a in zip(prompts, answers)]
    refs = [(p + reference_tokens(tokenizer, e), len(p)) for p, e in zip(prompts, train)]
    n = len(train)
    train_set = head_examples(model, own[:n] + refs, args.depth)
    eval_set = head_examples(model, own[n:], args.depth)
    print(f"features: {len(train_set[0])} train / {len(eval_set[0])} held-out positions in "
          f"{time.perf_counter() - start - gen_s:.0f} s", flush=True)
    return train_set, eval_set


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--domain", default="math", choices=["math", "sql"],
                        help="GSM8K (train / test split) or Spider (held-out databases)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--train-prompts", type=int, default=96)
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--features", help="cache of the target's answers' hidden states and labels (reused when present)")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    if args.features and os.path.exists(args.features):
        train_set, eval_set = torch.load(args.features)
    else:
        train_set, eval_set = features(model, tokenizer, args, start)
        if args.features:
            torch.save((train_set, eval_set), args.features)
    untrained = head_accuracy(draft_head.DraftHead(train_set[0].shape[1], args.depth), model, *eval_set)
    sample = torch.randperm(len(train_set[0]), generator=torch.Generator().manual_seed(0))[:2048]
    curve = []

    def log(message, head):
        curve.append(head_accuracy(head, model, *eval_set))
        print(f"{message}; held-out right by depth {[round(a, 3) for a in curve[-1]['accuracy_by_depth']]}, "
              f"leading {curve[-1]['leading_right']:.3f}", flush=True)

    head = fit_head(model, *train_set, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, log=log)
    result = {"train_sample": head_accuracy(head, model, *(t[sample] for t in train_set)), "held_out_by_epoch": curve,
              "held_out": head_accuracy(head, model, *eval_set),
              "held_out_untrained": untrained, "train_positions": len(train_set[0]),
              "seconds": time.perf_counter() - start,
              "args": vars(args), "description": draft_head.describe(head),
              "conditions": f"{torch.get_num_threads()} thread(s), float32", "load_average_after": os.getloadavg()}
    print(json.dumps(result, indent=1), flush=True)
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    draft_head.save(head, args.out, model)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
