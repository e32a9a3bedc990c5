"""The ``cllm-rt`` command: ``generate`` with the exact runtime, ``collect`` Jacobi trajectories,
consistency-``train`` a CLLM, run the end-to-end ``demo``, ``serve`` an OpenAI-compatible HTTP API.

This module only parses: each subcommand imports its room (runtime, training, demo) when it runs, so
``cllm-rt --help`` imports neither torch nor any of them. Errors about the user's inputs end the command
with a one-line message and exit status 2 instead of a traceback. ``collect`` and ``train`` run unchanged
under ``torchrun --nproc_per_node K`` (see :mod:`cllm_rt.training.distributed`).

Threads: OpenMP's idle threads spin by default, and with as many torch threads as cores any other busy
process makes every parallel region wait for a descheduled thread (measured on 2 cores: the demo 11x and
``examples/quickstart.py`` 33x slower). The command therefore sets ``OMP_WAIT_POLICY=PASSIVE`` before
torch is imported, unless the environment already sets a policy; ``--threads`` sets torch's thread count.
"""

from __future__ import annotations

import argparse
import os
import sys

# Errors that describe bad inputs (paths, settings, data); anything else is a bug and keeps its traceback.
_USER_ERRORS = (ValueError, OSError, NotImplementedError)
_DTYPES = ["auto", "float32", "bfloat16", "float16", "float64"]


def _start_torch(threads: int | None):
    """Import torch with a wait policy that survives a busy machine; apply ``--threads``."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch


def _token_id_option(value: str):
    """``--eos-token-id``: an id, several ids separated by commas, or ``none`` (never stop at a token)."""
    if value.lower() == "none":
        return None
    try:
        ids = [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected token ids like 2 or 2,32000, or none; got {value!r}") from None
    return ids if len(ids) > 1 else ids[0]


def _special_tokens(args) -> dict:
    """Only the options the user gave: an absent one falls back on the generation config (as in
    ``model.generate``), ``none`` disables it."""
    return {name: getattr(args, name) for name in ("eos_token_id", "pad_token_id")
            if getattr(args, name, _ABSENT) is not _ABSENT}


_ABSENT = object()


def _generate(args) -> None:
    torch = _start_torch(args.threads)
    from transformers import TextStreamer

    from .models import load_model
    from .runtime.decoding import generate
    from .runtime.inputs import greedy_generation_config

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device, weights=args.weights)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    if not args.no_chat_template and getattr(tokenizer, "chat_template", None):
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = generate(model, inputs["input_ids"], inputs.get("attention_mask"), max_new_tokens=args.max_new_tokens,
                   block_size=args.block_size, seed=args.seed, streamer=streamer,
                   generation_config=greedy_generation_config(model.generation_config)
                   if args.ignore_generation_config else None, **_special_tokens(args))
    stats = out.stats
    new = stats.new_tokens[0]
    print(f"\n{new} tokens in {stats.wall_seconds:.2f} s: {new / stats.wall_seconds:.1f} tokens/s, "
          f"{stats.tokens_per_forward:.2f} tokens per forward ({stats.forward_passes} forwards, block size "
          f"{args.block_size})", file=sys.stderr)


def _prompt_template(args) -> str | None:
    template = args.prompt_template
    if template is not None:
        template = template.replace("\\n", "\n").replace("\\t", "\t")  # "\n" typed inside shell quotes
        if "{question}" not in template:
            raise ValueError("--prompt-template must contain {question}")
    return template


def _collect(args) -> None:
    _start_torch(args.threads)
    from .training.collect import CollectSettings
    from .training.prompt_file import collect_from_files

    template = _prompt_template(args)
    settings = CollectSettings(block_size=args.block_size, max_new_tokens=args.max_new_tokens, seed=args.seed,
                               prompt_template=template, drop_repetitive=args.drop_repetitive,
                               keep_reference=args.keep_reference, shard_size=args.shard_size,
                               skip_long_prompts=args.skip_long_prompts)
    manifest = collect_from_files(args.model, args.data, args.out, settings, batch_size=args.batch_size,
                                  dtype=args.dtype, **_special_tokens(args))
    repetitive = manifest["prompts_repetitive"]
    print(f"{manifest['prompts_done']} prompts done ({manifest['prompts_kept']} kept"
          f"{'' if repetitive is None else f', {repetitive} repetitive dropped'}) in {len(manifest['shards'])} "
          f"shards: {args.out}")


def _train(args) -> None:
    _start_torch(args.threads)
    from .training.train import TrainConfig, train

    config = TrainConfig(objective=args.objective, loss=args.loss, max_steps=args.max_steps, lr=args.lr,
                         batch_size=args.batch_size, grad_accum=args.grad_accum, warmup=args.warmup, seed=args.seed,
                         save_every=args.save_every, keep_models=args.keep_models,
                         grad_checkpointing=args.grad_checkpointing,
                         ar_weight=args.ar_weight, ar_target=args.ar_target, distill_weight=args.distill_weight,
                         max_grad_norm=args.max_grad_norm,
                         weight_decay=args.weight_decay, fsdp=args.fsdp, noise_window=args.noise_window,
                         heldout=args.heldout, min_agreement=args.min_agreement, train_layers=args.train_layers)
    last = train(args.model, args.trajectories, args.out, config, device=args.device)
    if last.get("event") == "stopped":
        print(f"{last['reason']}; model saved to {args.out}")
    elif last:
        distill = f", distill {last['distill']:.4f}" if "distill" in last else ""
        print(f"step {last['step']}: loss {last['loss']:.4f} (consistency {last['consistency']:.4f}, "
              f"ar {last['ar']:.4f}{distill}); model saved to {args.out}")


def _train_head(args) -> None:
    _start_torch(args.threads)
    from .training.draft_head import train_head

    result = train_head(args.model, args.data, args.out, prompt_template=_prompt_template(args), use_reference=args.use_reference,
                        max_new_tokens=args.max_new_tokens, depth=args.depth, epochs=args.epochs, lr=args.lr,
                        weight_decay=args.weight_decay, seed=args.seed)
    print(f"training positions {result['positions']}: right by depth "
          f"{', '.join(f'{a:.2f}' for a in result['accuracy_by_depth'])}")


def _demo(args) -> None:
    _start_torch(None)  # the pipeline sets its own thread count
    from .demo.pipeline import run

    preset = "quick" if args.quick else "full" if args.full else "default"
    run(args.out, preset=preset, domains=args.domains, data_dir=args.data_dir, seed=args.seed, threads=args.threads,
        until=args.until, target=args.target)


def _serve(args) -> None:
    api_key = args.api_key if args.api_key is not None else os.environ.get("CLLM_RT_API_KEY")
    if api_key == "":  # set but empty: most likely a key that failed to arrive, so never read as "no key"
        raise ValueError("the API key (--api-key or CLLM_RT_API_KEY) is empty: give a key, or unset "
                         "CLLM_RT_API_KEY to serve without one")
    torch = _start_torch(args.threads)
    try:
        from .serve import serve
    except ModuleNotFoundError as error:
        if error.name not in _SERVE_PACKAGES:
            raise
        raise ValueError(f"the server needs {error.name}: pip install 'cllm_rt[serve]'") from None

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    serve(args.model, host=args.host, port=args.port, api_key=api_key, dtype=args.dtype, device=device,
          weights=args.weights,
          model_name=args.served_model_name, block_size=args.block_size, corpus=args.corpus,
          max_batch=args.max_batch, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes)


# the serve extra (setup.py) and what it brings
_SERVE_PACKAGES = {"fastapi", "uvicorn", "prometheus_client", "starlette", "pydantic"}


def _add_special_token_options(parser, pad: bool = True) -> None:
    parser.add_argument("--eos-token-id", type=_token_id_option, default=_ABSENT,
                        help="stop at this token id (or ids 2,32000; 'none': never); default: the generation config's")
    if pad:
        parser.add_argument("--pad-token-id", type=_token_id_option, default=_ABSENT,
                            help="pad finished rows with this id; default: the generation config's")


def _add_weights_option(parser) -> None:
    parser.add_argument("--weights", choices=["int8", "int8+head"],
                        help="quantize at load: int8 layer linears (int8+head: the LM head too); decoding is exact "
                        "for the quantized model, whose answers differ from the stored one's (README, int8)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cllm-rt", description="Exact Jacobi decoding for Hugging Face models; "
                                     "collect Jacobi trajectories and consistency-train a CLLM (Kou et al. 2024).")
    commands = parser.add_subparsers(dest="command", required=True)
    model_help = "a Hugging Face model directory (with its tokenizer) or a short name: smollm2-135m-instruct"

    gen = commands.add_parser("generate", help="stream a greedy answer, decoded exactly with Jacobi decoding")
    gen.add_argument("--model", required=True, help=model_help)
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--block-size", type=int, default=16)
    gen.add_argument("--seed", type=int, default=0, help="seed of the Jacobi guesses (never changes the output)")
    gen.add_argument("--dtype", default="auto", choices=_DTYPES)
    _add_weights_option(gen)
    gen.add_argument("--device", help="default: cuda when available, else cpu")
    gen.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    gen.add_argument("--no-chat-template", action="store_true",
                     help="feed the prompt as raw text even when the tokenizer has a chat template")
    gen.add_argument("--ignore-generation-config", action="store_true",
                     help="decode the plain argmax even if the model's generation config sets e.g. repetition_penalty")
    _add_special_token_options(gen)
    gen.set_defaults(run=_generate)

    collect = commands.add_parser("collect", help="collect Jacobi trajectories of a model on a JSON-lines data file")
    collect.add_argument("--model", required=True, help=model_help)
    collect.add_argument("--data", required=True, help="JSON lines with a 'prompt' (or 'question') field")
    collect.add_argument("--out", required=True, help="trajectory directory (resumed when it exists)")
    collect.add_argument("--block-size", type=int, required=True, help="Jacobi block size n")
    collect.add_argument("--max-new-tokens", type=int, required=True)
    collect.add_argument("--prompt-template", help="format of a 'question' field, e.g. "
                         "'Question:\\n{question}\\nAnswer:\\n' (\\n and \\t are unescaped)")
    collect.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    collect.add_argument("--seed", type=int, default=0, help="seed of the random initial guesses")
    collect.add_argument("--shard-size", type=int, default=64, help="prompts per shard file (the resume unit)")
    collect.add_argument("--drop-repetitive", action=argparse.BooleanOptionalAction, default=True,
                         help="drop answers that loop on a short unit (default; the manifest counts them)")
    collect.add_argument("--keep-reference", action="store_true",
                         help="store the data's 'answer' field for the AR loss (train --ar-target reference)")
    collect.add_argument("--skip-long-prompts", action="store_true",
                         help="leave out prompts too long for max_new_tokens within the model's positions "
                              "(default: refuse them before collecting anything)")
    collect.add_argument("--dtype", default="auto", choices=_DTYPES)
    collect.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    _add_special_token_options(collect, pad=False)
    collect.set_defaults(run=_collect)

    train = commands.add_parser("train", help="consistency-train a model on collected trajectories")
    train.add_argument("--model", required=True, help="the model the trajectories were collected with "
                       "(a Hugging Face directory or a short name)")
    train.add_argument("--trajectories", required=True, help="directory written by `cllm-rt collect`")
    train.add_argument("--out", required=True, help="output model directory (a run there is resumed)")
    train.add_argument("--objective", choices=["cllm-global", "cllm-local", "jacobi-forcing"], default="cllm-global",
                       help="CLLM's global or local consistency (two forwards per block), or Jacobi Forcing's "
                            "packed objective (one forward per answer, every block)")
    train.add_argument("--loss", choices=["global", "local"], help="deprecated: --objective cllm-global/cllm-local")
    train.add_argument("--max-steps", type=int, help="optimizer steps (default: one pass over the samples)")
    train.add_argument("--lr", type=float, default=2e-5)
    train.add_argument("--batch-size", type=int, default=8,
                       help="samples per process per micro-step: blocks (cllm-*) or answers (jacobi-forcing)")
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--warmup", type=int, default=0, help="linear warmup steps before the cosine decay")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--save-every", type=int, default=100, help="checkpoint (and held-out check) every N steps")
    train.add_argument("--keep-models", action="store_true",
                       help="also keep each checkpoint's weights as a model directory OUT/step-N (to evaluate a curve)")
    train.add_argument("--grad-checkpointing", action="store_true")
    train.add_argument("--ar-weight", type=float, default=10.0, help="weight of the AR loss")
    train.add_argument("--ar-target", choices=["greedy", "reference"], default="greedy",
                       help="AR loss on the model's own greedy answer or the data's reference answer")
    train.add_argument("--distill-weight", type=float, default=0.0,
                       help="weight of KL(frozen source model || model) at the AR positions (0: off; with it "
                            "--ar-weight may be 0)")
    train.add_argument("--train-layers", type=int, default=0, metavar="N",
                       help="train only the top N decoder layers and the final norm; the layers below take no "
                            "backward (default 0: every parameter)")
    train.add_argument("--max-grad-norm", type=float, default=1.0)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--fsdp", action="store_true", help="shard with FSDP instead of DDP (under torchrun)")
    train.add_argument("--noise-window", type=int, default=16,
                       help="jacobi-forcing: W of the noise schedule linspace(0, 1, W)[block mod W]")
    train.add_argument("--heldout", type=int, default=0,
                       help="keep N trajectory prompts out of training; at each checkpoint decode them and stop "
                            "(rolling back to the last checkpoint) if agreement with the target's answers is "
                            "below --min-agreement (default 0: no check)")
    train.add_argument("--min-agreement", type=float, default=0.75,
                       help="held-out agreement (difflib similarity of the greedy answers to the target's) "
                            "below which the run stops")
    train.add_argument("--device", help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    train.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    train.set_defaults(run=_train)

    head = commands.add_parser("train-head", help="train a draft head for a frozen model on its own greedy answers "
                               "(exact: the model verifies every guess); writes the model with the head to --out")
    head.add_argument("--model", required=True, help=model_help)
    head.add_argument("--data", required=True, help="JSON lines with a 'prompt' (or 'question') field")
    head.add_argument("--out", required=True, help="output model directory (the model and its head)")
    head.add_argument("--prompt-template", help="format of a 'question' field (as for collect)")
    head.add_argument("--use-reference", action="store_true",
                      help="also learn from the stretches of the data's 'answer' field that the model agrees with")
    head.add_argument("--max-new-tokens", type=int, default=256, help="length of the model's greedy answers")
    head.add_argument("--depth", type=int, default=4, help="tokens guessed past the next one")
    head.add_argument("--epochs", type=int, default=6)
    head.add_argument("--lr", type=float, default=1e-3)
    head.add_argument("--weight-decay", type=float, default=0.0)
    head.add_argument("--seed", type=int, default=0)
    head.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    head.set_defaults(run=_train_head)

    demo = commands.add_parser("demo", help="the whole pipeline on real data on this CPU: a pretrained target, "
                               "trajectories, a CLLM, and a table of decoding methods (resumable)")
    demo.add_argument("--out", default="runs/demo", help="output directory (resumed when it exists)")
    size = demo.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a smoke run of every stage (under 10 minutes on 2 cores)")
    size.add_argument("--full", action="store_true", help="the largest budget (hours on 2 cores)")
    demo.add_argument("--target", default="smollm2-135m-instruct", help="the target model: " + model_help)
    demo.add_argument("--domains", nargs="+", help="some of: code math sql chat (default: every domain whose data "
                      "is present)")
    demo.add_argument("--data-dir", help="folder with gsm8k/ and spider/ (default: ../shared/data from the "
                      "current directory)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    demo.add_argument("--until", help="stop after this stage: data, target, collect, head, train or evaluate (a rerun "
                      "without it continues)")
    demo.set_defaults(run=_demo)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, "
                                "/v1/chat/completions) with continuous batching, greedy and exact")
    serve.add_argument("--model", required=True, help=model_help)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1 and /metrics; KEY1,KEY2,... "
                       "for one key per tenant (default: $CLLM_RT_API_KEY, else no key; an empty key is an error)")
    serve.add_argument("--served-model-name", help="the model id clients send (default: --model as given)")
    serve.add_argument("--block-size", type=int, default=16)
    serve.add_argument("--corpus", choices=["off", "shared", "per-key"], default="off",
                       help="draft from earlier answers: off (default: one client's text never speeds up, and so "
                       "never reveals itself to, another), shared (one corpus for every client: faster on "
                       "repeated content) or per-key (one corpus per API key: needs --api-key)")
    serve.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    serve.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; more get 503")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    serve.add_argument("--dtype", default="auto", choices=_DTYPES)
    _add_weights_option(serve)
    serve.add_argument("--device", help="default: cuda when available, else cpu")
    serve.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    serve.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except _USER_ERRORS as error:
        print(f"cllm-rt {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
