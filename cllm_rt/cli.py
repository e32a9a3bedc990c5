"""The ``cllm-rt`` command: ``collect`` Jacobi trajectories, consistency-``train`` a CLLM, ``generate`` with it.

Each subcommand parses its options and calls one library function; errors about the user's inputs end the
command with a one-line message and exit status 2 instead of a traceback. ``collect`` and ``train`` run
unchanged under ``torchrun --nproc_per_node K`` (see :mod:`cllm_rt.distributed`).
"""

from __future__ import annotations

import argparse
import sys

# Errors that describe bad inputs (paths, settings, data); anything else is a bug and keeps its traceback.
_USER_ERRORS = (ValueError, OSError, NotImplementedError)


def _collect(args) -> None:
    from .trajectory import CollectSettings, collect_from_files

    template = args.prompt_template
    if template is not None:
        template = template.replace("\\n", "\n").replace("\\t", "\t")  # "\n" typed inside shell quotes
        if "{question}" not in template:
            raise ValueError("--prompt-template must contain {question}")
    settings = CollectSettings(block_size=args.block_size, max_new_tokens=args.max_new_tokens, seed=args.seed,
                               prompt_template=template, drop_repetitive=args.drop_repetitive,
                               keep_reference=args.keep_reference, shard_size=args.shard_size)
    manifest = collect_from_files(args.model, args.data, args.out, settings, batch_size=args.batch_size,
                                  dtype=args.dtype)
    print(f"{manifest['prompts_done']} prompts done ({manifest['prompts_kept']} kept) in "
          f"{len(manifest['shards'])} shards: {args.out}")


def _train(args) -> None:
    from .train import TrainConfig, train

    config = TrainConfig(loss=args.loss, max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size,
                         grad_accum=args.grad_accum, warmup=args.warmup, seed=args.seed, save_every=args.save_every,
                         grad_checkpointing=args.grad_checkpointing, ar_weight=args.ar_weight,
                         ar_target=args.ar_target, max_grad_norm=args.max_grad_norm,
                         weight_decay=args.weight_decay, fsdp=args.fsdp)
    last = train(args.model, args.trajectories, args.out, config, device=args.device)
    if last:
        print(f"step {last['step']}: loss {last['loss']:.4f} (consistency {last['consistency']:.4f}, "
              f"ar {last['ar']:.4f}); model saved to {args.out}")


def _generate(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    from .decoding import generate

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto").to(device).eval()
    inputs = tokenizer(args.prompt, return_tensors="pt")
    out = generate(model, inputs["input_ids"], inputs.get("attention_mask"), max_new_tokens=args.max_new_tokens,
                   block_size=args.block_size, seed=args.seed,
                   streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    stats = out.stats
    new = stats.new_tokens[0]
    print(f"\n{new} tokens in {stats.wall_seconds:.2f} s: {new / stats.wall_seconds:.1f} tokens/s, "
          f"{stats.tokens_per_forward:.2f} tokens per forward ({stats.forward_passes} forwards, block size "
          f"{args.block_size})", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cllm-rt", description="Collect Jacobi trajectories, consistency-train "
                                     "a CLLM (Kou et al. 2024), and generate with Jacobi decoding.")
    commands = parser.add_subparsers(dest="command", required=True)

    collect = commands.add_parser("collect", help="collect Jacobi trajectories of a model on a JSON-lines data file")
    collect.add_argument("--model", required=True, help="Hugging Face model directory (with its tokenizer)")
    collect.add_argument("--data", required=True, help="JSON lines with a 'prompt' (or 'question') field")
    collect.add_argument("--out", required=True, help="trajectory directory (resumed when it exists)")
    collect.add_argument("--block-size", type=int, required=True, help="Jacobi block size n")
    collect.add_argument("--max-new-tokens", type=int, required=True)
    collect.add_argument("--prompt-template", help="format of a 'question' field, e.g. "
                         "'Question:\\n{question}\\nAnswer:\\n' (\\n and \\t are unescaped)")
    collect.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    collect.add_argument("--seed", type=int, default=0, help="seed of the random initial guesses")
    collect.add_argument("--shard-size", type=int, default=64, help="prompts per shard file (the resume unit)")
    collect.add_argument("--drop-repetitive", action="store_true", help="drop answers that loop on a short unit")
    collect.add_argument("--keep-reference", action="store_true",
                         help="store the data's 'answer' field for the AR loss (train --ar-target reference)")
    collect.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "float64"])
    collect.set_defaults(run=_collect)

    train = commands.add_parser("train", help="consistency-train a model on collected trajectories")
    train.add_argument("--model", required=True, help="Hugging Face model directory to start from")
    train.add_argument("--trajectories", required=True, help="directory written by `cllm-rt collect`")
    train.add_argument("--out", required=True, help="output model directory (a run there is resumed)")
    train.add_argument("--loss", choices=["global", "local"], default="global", help="consistency loss")
    train.add_argument("--max-steps", type=int, help="optimizer steps (default: one pass over the blocks)")
    train.add_argument("--lr", type=float, default=2e-5)
    train.add_argument("--batch-size", type=int, default=8, help="blocks per process per micro-step")
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--warmup", type=int, default=0, help="linear warmup steps before the cosine decay")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps")
    train.add_argument("--grad-checkpointing", action="store_true")
    train.add_argument("--ar-weight", type=float, default=10.0, help="weight of the AR loss")
    train.add_argument("--ar-target", choices=["greedy", "reference"], default="greedy",
                       help="AR loss on the model's own greedy answer or the data's reference answer")
    train.add_argument("--max-grad-norm", type=float, default=1.0)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--fsdp", action="store_true", help="shard with FSDP instead of DDP (under torchrun)")
    train.add_argument("--device", help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    train.set_defaults(run=_train)

    gen = commands.add_parser("generate", help="stream a greedy answer with Jacobi decoding")
    gen.add_argument("--model", required=True, help="Hugging Face model directory (with its tokenizer)")
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--block-size", type=int, default=16)
    gen.add_argument("--seed", type=int, default=0, help="seed of the Jacobi guesses (never changes the output)")
    gen.add_argument("--device", help="default: cuda when available, else cpu")
    gen.set_defaults(run=_generate)
    from .demo import add_parser as add_demo_parser  # imported here: the demo pulls in its data modules

    add_demo_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except _USER_ERRORS as error:
        print(f"cllm-rt {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
