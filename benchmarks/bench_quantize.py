"""How far weight-only int8 (``load_model(..., weights=...)``, ``cllm_rt.quantize``) moves SmolLM2's answers.

Held-out GSM8K prompts (``cllm_rt.demo.data``), each answered greedily (cllm_rt's default decoding, batch 1, up to
``--max-new`` tokens, cut after EOS) by the float32 model, its int8 copy (``weights="int8"``: the layers) and its
``"int8+head"`` copy (and, with ``--variants``, its bf16 copy for comparison), the decodes interleaved prompt by
prompt. Reports, against the float32 answers, the share of
identical answers, the tokens each answer shares with the float32 one before the first difference, difflib's
agreement (``training.train.sequence_agreement``); and each model's decode speed.

    OMP_NUM_THREADS=2 python benchmarks/bench_quantize.py [--variants int8 int8+head bfloat16] [--prompts 8]
        [--max-new 128] [--data-dir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from bench_decoding import machine

from cllm_rt.demo.data import load_domain, prompt_tokens
from cllm_rt.models import load_model
from cllm_rt.training.draft_head import greedy_answers
from cllm_rt.training.train import sequence_agreement

NAME = "smollm2-135m-instruct"


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["int8", "int8+head"],
                        choices=["int8", "int8+head", "bfloat16"], help="compared with float32")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new", type=int, default=128)
    parser.add_argument("--data-dir")
    parser.add_argument("--json")
    args = parser.parse_args()
    info = machine()
    models = {name: load_model(NAME, dtype="bfloat16" if name == "bfloat16" else "float32",
                               weights=name if name.startswith("int8") else None)
              for name in ["float32"] + args.variants}
    tokenizer = models["float32"][1]
    eos = set() if tokenizer.eos_token_id is None else {tokenizer.eos_token_id}
    examples = load_domain("math", args.data_dir).eval[:args.prompts]
    answers = {name: [] for name in models}
    seconds = {name: 0.0 for name in models}
    for example in examples:
        prompt = prompt_tokens(tokenizer, example)
        for name, (model, _) in models.items():
            start = time.perf_counter()
            answers[name] += greedy_answers(model, [prompt], args.max_new, eos)
            seconds[name] += time.perf_counter() - start
    result = dict(prompts=[e.source for e in examples], decode_seconds=seconds,
                  mean_answer_tokens={name: statistics.mean(map(len, a)) for name, a in answers.items()},
                  tokens_per_second={name: sum(map(len, answers[name])) / seconds[name] for name in models})
    for name in args.variants:
        prefixes = [common_prefix(a, b) for a, b in zip(answers[name], answers["float32"])]
        result[name] = dict(
            identical=sum(a == b for a, b in zip(answers[name], answers["float32"])) / len(examples),
            matching_prefix_tokens=prefixes, mean_matching_prefix=statistics.mean(prefixes),
            mean_sequence_agreement=statistics.mean(map(sequence_agreement, answers[name], answers["float32"])))
        print(f"{name} against float32: {result[name]}")
    print(f"tokens/s: {result['tokens_per_second']}, mean answer tokens: {result['mean_answer_tokens']}")
    result["answers"] = {name: [tokenizer.decode(a) for a in answers[name]] for name in models}
    info["load_average_after"] = os.getloadavg()
    print(f"machine: {info['cpu']} family {info['cpu_family']} model {info['model']}, {torch.get_num_threads()} "
          f"thread(s), torch {torch.__version__}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=info, settings=vars(args), threads=torch.get_num_threads(), **result), f, indent=1)


if __name__ == "__main__":
    main()
