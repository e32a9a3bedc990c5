"""cllm_rt's decoders on a small random-init Llama (no downloads), each checked against model.generate.

    python examples/quickstart.py [--block-size 16] [--max-new-tokens 64]

A random-init model is not a CLLM and its text has nothing for suffix drafts to find, so expect about one
token per forward here; the point is that every decoder returns exactly the tokens of greedy
autoregressive decoding. Float64, where rounding cannot flip an argmax: in lower precision a block or
tree forward rounds differently from a one-token forward, and a near-tie may flip (see README).
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
    model = transformers.LlamaForCausalLM(config).double().eval()
    prompts = torch.randint(3, config.vocab_size, (2, 12))
    mask = torch.ones_like(prompts)
    mask[1, :5] = 0  # a ragged batch: row 1 is left-padded to 7 real tokens

    expected = model.generate(prompts, attention_mask=mask, do_sample=False, max_new_tokens=args.max_new_tokens)
    print(f"native ops: {cllm_rt.ops.native_available()}")
    decoders = {"autoregressive": dict(block_size=1, drafts=None),
                f"Jacobi, block {args.block_size}": dict(block_size=args.block_size, drafts=None),
                "default (token trees)": dict(block_size=args.block_size)}
    for name, options in decoders.items():
        out = cllm_rt.generate(model, prompts, mask, max_new_tokens=args.max_new_tokens, **options)
        same = torch.equal(out.sequences, expected)
        print(f"{name:>22}: {out.stats.forward_passes} forwards, "
              f"{out.stats.tokens_per_forward:.2f} tokens/forward, {out.stats.wall_seconds * 1e3:.0f} ms, "
              f"identical to model.generate: {same}")
        if not same:
            raise SystemExit("mismatch against model.generate")


if __name__ == "__main__":
    main()
