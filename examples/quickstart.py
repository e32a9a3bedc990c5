"""Greedy Jacobi decoding on a small random-init Llama (no downloads), checked against model.generate.

    python examples/quickstart.py [--block-size 16] [--max-new-tokens 64]

A random-init model is not a CLLM, so expect about one token per forward here; the point is that every
block size returns exactly the tokens of greedy autoregressive decoding.
"""

import argparse

import torch
import transformers

import cllm_rt


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=None,
                                      pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    prompts = torch.randint(3, config.vocab_size, (2, 12))
    mask = torch.ones_like(prompts)
    mask[1, :5] = 0  # a ragged batch: row 1 is left-padded to 7 real tokens

    expected = model.generate(prompts, attention_mask=mask, do_sample=False, max_new_tokens=args.max_new_tokens)
    print(f"native ops: {cllm_rt.ops.native_available()}")
    for block_size in sorted({1, args.block_size}):
        out = cllm_rt.generate(model, prompts, mask, max_new_tokens=args.max_new_tokens, block_size=block_size)
        same = torch.equal(out.sequences, expected)
        print(f"block_size={block_size:>3}: {out.stats.forward_passes} forwards, "
              f"{out.stats.tokens_per_forward:.2f} tokens/forward, {out.stats.wall_seconds * 1e3:.0f} ms, "
              f"identical to model.generate: {same}")
        if not same:
            raise SystemExit("mismatch against model.generate")


if __name__ == "__main__":
    main()
