"""HF generate vs cllm_rt autoregressive (block_size=1) vs cllm_rt Jacobi, on a random-init Llama.

Prints a table and writes JSON. Besides wall time and tokens per forward it splits each cllm_rt run into
model forward (base model + LM head), the fused verify op, and everything else (the loop's own overhead).

"same" says whether the output equals HF generate's token for token: guaranteed in float64 (tests), and
in float32 as long as no near-tie flips; in bfloat16 a different (more accurate) attention accumulation
can flip a near-tie, and then the rest of the sequence differs.

A random-init model is not a CLLM: its Jacobi blocks rarely accept more than one token, so Jacobi here
shows the *cost* side (block forward vs one-token forward); the gain needs a consistency-trained model.

    python benchmarks/bench_generate.py [--quick] [--json out.json] [--reference-ops]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import torch
import transformers

import cllm_rt
from cllm_rt import decoding, ops

MODELS = {  # the shapes MACHINE-NOTES measured forward costs for
    "llama-7M": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=4, vocab_size=8192),
    "llama-58M": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=32000),
}


class _Timer:
    """Accumulates wall time of wrapped callables (forward, verify) during one generate call."""

    def __init__(self):
        self.seconds = {"forward": 0.0, "verify": 0.0}

    def wrap(self, key, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds[key] += time.perf_counter() - start
            return out
        return timed


def _profiled_generate(model, ids, mask, **kwargs):
    timer = _Timer()
    saved = decoding.forward_block, ops.jacobi_verify, ops.lm_head_argmax, model.lm_head.forward
    decoding.forward_block = timer.wrap("forward", saved[0])
    ops.jacobi_verify = timer.wrap("verify", saved[1])
    ops.lm_head_argmax = timer.wrap("forward", saved[2])  # the fused head replaces LM head + verify
    model.lm_head.forward = timer.wrap("forward", saved[3])
    try:
        out = cllm_rt.generate(model, ids, mask, **kwargs)
    finally:
        decoding.forward_block, ops.jacobi_verify, ops.lm_head_argmax, model.lm_head.forward = saved
    return out, timer.seconds


def _interleaved_medians(variants, repeats):
    """Median seconds and last result of each variant, run in shuffled rounds after one warm-up round, so
    drift on a shared machine hits every variant alike."""
    times = {name: [] for name in variants}
    results = {}
    for round_ in range(repeats + 1):
        for name in random.sample(list(variants), len(variants)):
            start = time.perf_counter()
            results[name] = variants[name]()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, results


def bench(name, dtype, batch, prompt_len, max_new, repeats):
    config = transformers.LlamaConfig(**MODELS[name], max_position_embeddings=4096, eos_token_id=None,
                                      pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    ids = torch.randint(3, config.vocab_size, (batch, prompt_len))
    mask = torch.ones_like(ids)
    variants = {"HF generate": lambda: model.generate(ids, attention_mask=mask, do_sample=False,
                                                      max_new_tokens=max_new, pad_token_id=0)}
    for block_size in (1, 16):
        variants[f"cllm_rt block {block_size}" + (" (AR)" if block_size == 1 else "")] = (
            lambda bs=block_size: _profiled_generate(model, ids, mask, max_new_tokens=max_new, block_size=bs))
    seconds, results = _interleaved_medians(variants, repeats)
    hf_time, hf_out = seconds["HF generate"], results["HF generate"]
    rows = [dict(method="HF generate", seconds=hf_time, tokens_per_forward=1.0, same_as_hf=True)]
    for method in list(variants)[1:]:
        out, parts = results[method]
        loop = out.stats.wall_seconds - out.stats.prefill_seconds
        decode_forward = parts["forward"] - out.stats.prefill_seconds  # prefill is itself a forward
        rows.append(dict(method=method, seconds=seconds[method], tokens_per_forward=out.stats.tokens_per_forward,
                         same_as_hf=torch.equal(out.sequences, hf_out),
                         forward_share=decode_forward / loop, verify_share=parts["verify"] / loop,
                         overhead_share=max(0.0, loop - decode_forward - parts["verify"]) / loop,
                         step_ms=1e3 * loop / max(out.stats.forward_passes, 1)))
    tokens = batch * max_new
    for row in rows:
        row.update(model=name, dtype=str(dtype).replace("torch.", ""), batch=batch, prompt=prompt_len,
                   new_tokens=max_new, tokens_per_second=tokens / row["seconds"],
                   speedup_vs_hf=hf_time / row["seconds"])
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small model, fewer tokens and repeats")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--reference-ops", action="store_true", help="force the pure-PyTorch ops")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(0)
    if args.reference_ops:
        ops.use_native_kernels(False)
    cases = [("llama-7M", torch.float32, 1, 128, 64, 3)] if args.quick else [
        ("llama-7M", torch.float32, 1, 256, 128, 5), ("llama-7M", torch.bfloat16, 1, 256, 128, 5),
        ("llama-7M", torch.float32, 4, 256, 128, 3), ("llama-58M", torch.float32, 1, 256, 128, 3)]
    rows = [row for case in cases for row in bench(*case)]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, native ops: {ops.native_available()}")
    header = f"{'model':<10}{'dtype':<9}{'B':>3} {'method':<24}{'s':>8}{'tok/s':>9}{'tok/fwd':>9}{'vs HF':>7}" \
             f"{'same':>6}{'step ms':>9}{'fwd%':>7}{'verify%':>9}{'loop%':>7}"
    print(header)
    for r in rows:
        extra = (f"{r['step_ms']:>9.2f}{100 * r['forward_share']:>7.1f}{100 * r['verify_share']:>9.1f}"
                 f"{100 * r['overhead_share']:>7.1f}") if "step_ms" in r else ""
        print(f"{r['model']:<10}{r['dtype']:<9}{r['batch']:>3} {r['method']:<24}{r['seconds']:>8.3f}"
              f"{r['tokens_per_second']:>9.1f}{r['tokens_per_forward']:>9.2f}{r['speedup_vs_hf']:>7.2f}"
              f"{'yes' if r['same_as_hf'] else 'NO':>6}{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(threads=args.threads, torch=torch.__version__, native=ops.native_available(),
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
