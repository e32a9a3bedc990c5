"""Trajectory collection: cllm_rt's KV-cached, batched collector against the CLLM paper's algorithm.

The paper's data preparation (Consistency_LLM ``data/generate_trajectory.py``) runs every Jacobi iteration
as a full forward over ``prompt + answer so far + current block`` with no cache, one prompt at a time.
cllm_rt keeps the context in a per-row KV cache (one n-token forward per iteration) and decodes several
prompts per batch. Both share :class:`cllm_rt.training.collect.TrajectoryBuilder` and the seeded guesses, so
they must produce identical trajectories (asserted), and the comparison is purely the cost of the forwards.

    python benchmarks/bench_collect.py [--model DIR] [--prompts 8] [--json out.json]

Without ``--model`` a random Llama of 4 layers, 256 wide, vocabulary 8k is built (as in MACHINE-NOTES).
Prints medians over ``--repeats`` runs (variants interleaved) and the time ratios; ``--json`` saves them.
"""

import argparse
import json
import statistics
import time

import torch
import transformers

from cllm_rt.training.collect import TrajectoryBuilder, decode_trajectories, prompt_seed


@torch.inference_mode()
def recompute_trajectories(model, prompts, seeds, *, block_size, max_new_tokens, eos):
    """The paper's algorithm: each Jacobi iteration is a full forward over the whole sequence, no cache."""
    builders = []
    for prompt, seed in zip(prompts, seeds):
        tokens = torch.tensor(prompt)
        builder = TrajectoryBuilder(prompt, seed, block_size, max_new_tokens, eos)
        builder.start(int(model(tokens[None]).logits[0, -1].argmax()))
        while not builder.finished:
            context = prompt + builder.answer  # everything final so far, the last final token included
            logits = model(torch.tensor([context + builder.states[-1][:-1]])).logits[0, len(context) - 1:]
            builder.advance(logits.argmax(-1).tolist())
        builders.append(builder)
    return builders


def _model(args):
    if args.model:
        return transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                                      eos_token_id=None)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="Hugging Face model directory (default: a random 7M-parameter Llama)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = _model(args)
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.prompts,), generator=generator)
    prompts = [torch.randint(3, model.config.vocab_size, (int(n),), generator=generator).tolist() for n in lengths]
    seeds = [prompt_seed(0, i) for i in range(args.prompts)]
    common = dict(block_size=args.block_size, max_new_tokens=args.max_new_tokens, eos=set())

    def cached(batch_size):
        return [b for first in range(0, len(prompts), batch_size)
                for b in decode_trajectories(model, prompts[first:first + batch_size],
                                             seeds[first:first + batch_size], **common)]

    variants = {"recompute (paper)": lambda: recompute_trajectories(model, prompts, seeds, **common),
                "kv cache, batch 1": lambda: cached(1),
                f"kv cache, batch {args.batch_size}": lambda: cached(args.batch_size)}
    seconds = {name: [] for name in variants}
    results = {}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not timed
        for name in (list(variants) if repeat % 2 else list(reversed(variants))):
            start = time.perf_counter()
            results[name] = variants[name]()
            if repeat:
                seconds[name].append(time.perf_counter() - start)

    reference = [(b.answer, b.blocks) for b in results["recompute (paper)"]]
    for name, builders in results.items():
        assert [(b.answer, b.blocks) for b in builders] == reference, f"{name}: trajectories differ from the paper's"
    iterations = sum(len(block.states) for b in reference for block in b[1])
    tokens = sum(len(answer) for answer, _ in reference)
    baseline = statistics.median(seconds["recompute (paper)"])
    report = {"machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}", "args": vars(args),
              "new_tokens": tokens, "jacobi_states": iterations, "variants": {}}
    print(f"{args.prompts} prompts, {tokens} answer tokens, {iterations} Jacobi states, block {args.block_size}, "
          f"{args.dtype}, {args.threads} threads; identical trajectories in every variant")
    for name, times in seconds.items():
        median = statistics.median(times)
        report["variants"][name] = {"median_seconds": median, "tokens_per_second": tokens / median,
                                    "speedup_vs_paper": baseline / median}
        print(f"  {name:22s} {median:8.3f} s  {tokens / median:8.1f} tok/s  x{baseline / median:5.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
