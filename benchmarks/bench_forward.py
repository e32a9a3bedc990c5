"""What a wider forward costs: one forward of n tokens after ``--context`` cached ones, against n = 1.

SmolLM2-135M-Instruct (``cllm_rt.models``), batch 1. For each thread count, every weight dtype's model loaded
at once and measured in interleaved rounds (the dtypes, variants and sizes shuffled every round, medians
reported); ``int8`` is the float32 model with its layer linears quantized (``load_model(..., weights="int8")``,
``cllm_rt.quantize``), ``int8+head`` its LM head too:

* **HF**: ``model(block, past_key_values=DynamicCache)`` with its full logits, the cache cropped back after
  each call (what HF's assisted generation pays per verify);
* **cllm_rt**: the runtime's own step, ``forward_block`` over the paged ``JacobiCache`` (its compact forward,
  ``runtime/compact.py``, with attention on ``ops.block_attention`` and linears on ``ops.linear`` where
  ``ops.linear_pays``, its layer loop the compiled op ``cllm_rt::decoder_layers``), then ``greedy_verify``;
  **cllm_rt Python layers**: the same with the loop in Python (``compact.use_native_layers(False)``, the op's
  reference); **cllm_rt HF modules**: the same step through the HF modules' forward (attention and linears
  routed by ``runtime/attention.py`` and ``runtime/linears.py``); **cllm_rt wide tiles**: the step with
  ``ops.linear``'s one- and two-row calls on its wide tiles, as before the plan measured streamed and paired
  rows;
* **linears**: the model's linear layers alone for n rows (every layer's q/k/v, o, gate/up, down, and the LM
  head), as ``F.linear`` calls and as ``ops.linear`` groups (q/k/v and gate/up share their input and are one
  call each; ``ops.linear_int8`` for an int8 model's layers, which have no ``F.linear``), to show where the
  forward's growth with n comes from;
* **weight-read limit**: the bytes of every weight the forward reads, divided by the memory bandwidth measured
  in the same rounds at the same thread count (the median of one ``torch.sum`` over a 1 GiB buffer per round:
  a shared host's bandwidth drifts, so it is sampled beside the forwards it bounds): the floor a forward of
  few tokens approaches when reading the weights is all it does.

    OMP_NUM_THREADS=2 python benchmarks/bench_forward.py [--threads 1 2] [--dtypes float32 bfloat16 int8 int8+head]
        [--sizes 1 2 4 8 16 32 64] [--context 256] [--rounds 9] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from bench_decoding import machine, wide_tiles

from cllm_rt import ops
from cllm_rt.models import load_model
from cllm_rt.quantize import Int8Linear
from cllm_rt.runtime import compact
from cllm_rt.runtime.attention import jacobi_attention
from cllm_rt.runtime.cache import JacobiCache
from cllm_rt.runtime.linears import routed_linears
from cllm_rt.runtime.step import forward_block, greedy_verify, prefill

NAME = "smollm2-135m-instruct"


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_bytes(model) -> int:
    """Bytes a forward reads of the weights: every parameter and buffer (an int8 model's weights) once (tied
    embeddings once, as the LM head: the input embedding reads only n rows)."""
    seen, total = set(), 0
    for p in (*model.parameters(), *model.buffers()):
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def linear_groups(model) -> list[list[torch.nn.Module]]:
    """Each decoder layer's linears grouped by the input they share, then the LM head."""
    groups = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        groups += [[attn.q_proj, attn.k_proj, attn.v_proj], [attn.o_proj], [mlp.gate_proj, mlp.up_proj],
                   [mlp.down_proj]]
    return groups + [[model.get_output_embeddings()]]


def variants(model, context: int, dtype: torch.dtype):
    """name -> fn(n) running one measured call for n new tokens (returning its own time where it sets up
    something untimed)."""
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(0))
    hf_cache = DynamicCache(config=model.config)
    model(prompt, past_key_values=hf_cache, use_cache=True)
    ours = JacobiCache(model.config.num_hidden_layers, torch.zeros(1, dtype=torch.int64), context + 128)
    with jacobi_attention(model):
        prefill(model, ours, prompt, torch.tensor([context]))
    groups = linear_groups(model)
    inputs = {}

    def block(n):
        return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n))

    def hf(n):
        model(block(n), past_key_values=hf_cache, use_cache=True)
        hf_cache.crop(-n)  # transformers 5.25: a negative count of tokens to drop

    def cllm_rt(n, compact_forward=True, native_layers=True, tiles=contextlib.nullcontext):
        # the Decoder enters these once for its lifetime (~2 ms each time), so they stay outside the timing
        compact.use_compact_forward(compact_forward)
        compact.use_native_layers(native_layers)
        try:
            with jacobi_attention(model), routed_linears(model), tiles():
                tokens = block(n)
                return _seconds(lambda: greedy_verify(model, forward_block(model, ours, tokens), tokens))
        finally:
            compact.use_compact_forward(True)
            compact.use_native_layers(True)

    def x(n, width):
        if (n, width) not in inputs:
            inputs[n, width] = torch.randn(n, width, dtype=dtype)
        return inputs[n, width]

    def torch_linears(n):
        for group in groups:
            for m in group:
                F.linear(x(n, m.in_features), m.weight)

    def ops_linears(n):
        for group in groups:
            if type(group[0]) is Int8Linear:
                ops.linear_int8(x(n, group[0].in_features), [m.weight for m in group], [m.scale for m in group])
            else:
                ops.linear(x(n, group[0].in_features), [m.weight for m in group])

    fns = {"HF": hf, "cllm_rt": cllm_rt, "cllm_rt wide tiles": lambda n: cllm_rt(n, tiles=wide_tiles),
           "cllm_rt Python layers": lambda n: cllm_rt(n, native_layers=False),
           "cllm_rt HF modules": lambda n: cllm_rt(n, compact_forward=False),
           "linears F.linear": torch_linears, "linears ops.linear": ops_linears}
    if any(type(m) is Int8Linear for m in model.modules()):
        del fns["linears F.linear"]  # torch has no int8 linear
    return fns


def measure(threads: int, dtype_names: list[str], sizes: list[int], context: int, rounds: int) -> list[dict]:
    """One result per dtype name, all measured in the same shuffled rounds."""
    torch.set_num_threads(threads)
    buffer = torch.ones(1 << 28)  # 1 GiB of float32: its sum streams from memory
    dtypes = {name: torch.float32 if name.startswith("int8") else getattr(torch, name) for name in dtype_names}
    models = {name: load_model(NAME, dtype=dtypes[name], weights=name if name.startswith("int8") else None)[0]
              for name in dtype_names}
    with torch.inference_mode():
        fns = {(d, name): fn for d in dtype_names for name, fn in variants(models[d], context, dtypes[d]).items()}
        times = {(d, name, n): [] for d, name in fns for n in sizes}
        rng = random.Random(0)
        for d, name, n in times:  # warm-up: every shape once
            fns[d, name](n)
        sums = []
        for _ in range(rounds):
            cases = list(times)
            rng.shuffle(cases)
            for d, name, n in cases:
                start = time.perf_counter()
                own = fns[d, name](n)
                times[d, name, n].append((own if own is not None else time.perf_counter() - start) * 1e3)
            sums.append(_seconds(buffer.sum))
    bandwidth = buffer.numel() * 4 / statistics.median(sums) / 1e9
    results = []
    for d in dtype_names:
        weights = weight_bytes(models[d])
        # int8 weights take float32's tuning (csrc/cpu/linear.cpp)
        plan = ops.linear_plan(dtypes[d])._asdict() if ops.native_available() else None
        results.append(dict(threads=threads, dtype=d, weight_mb=weights / 2**20,
                            weight_read_limit_ms=weights / (bandwidth * 1e9) * 1e3,
                            median_ms={f"{name}|{n}": statistics.median(t)
                                       for (dd, name, n), t in times.items() if dd == d},
                            linear_plan=plan))
    return results


def table(result: dict, names: list[str], sizes: list[int]) -> str:
    names = [name for name in names if f"{name}|1" in result["median_ms"]]  # an int8 model has no F.linear
    lines = [f"\n{result['dtype']}, {result['threads']} thread(s): weight-read limit "
             f"{result['weight_read_limit_ms']:.1f} ms ({result['weight_mb']:.0f} MiB of weights)",
             "| n | " + " | ".join(f"{name} ms (x n=1)" for name in names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for n in sizes:
        cells = []
        for name in names:
            ms, one = result["median_ms"][f"{name}|{n}"], result["median_ms"][f"{name}|1"]
            cells.append(f"{ms:.1f} ({ms / one:.2f})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    plan = result["linear_plan"]
    if plan:
        lines.append(f"ops.linear at 1-{len(plan['pays'])} rows (measured on this machine): {plan['pays']}, "
                     f"{plan['tiles'][0]} / {plan['tiles'][1]} tiles at 1 / 2 rows, next tile prefetched "
                     + " / ".join('into L2' if l2 else 'non-temporally' for l2 in plan['prefetch_l2'])
                     + " at 1 / 2 / more rows")
    one = result["median_ms"]["cllm_rt|1"]
    lines.append(f"one-token cllm_rt forward at {result['weight_read_limit_ms'] / one:.0%} of the weight-read limit")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16", "int8", "int8+head"],
                        help="int8: float32 with int8 layer weights; int8+head: and an int8 LM head")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--context", type=int, default=256, help="cached tokens before the block")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--json")
    args = parser.parse_args()
    if 1 not in args.sizes or max(args.sizes) > 128:
        parser.error("--sizes must include 1 (the ratios' base) and stay <= 128")
    info = machine()
    results = []
    for threads in args.threads:
        for result in measure(threads, args.dtypes, args.sizes, args.context, args.rounds):
            results.append(result)
            print(table(result, ["HF", "cllm_rt", "cllm_rt wide tiles", "cllm_rt Python layers", "cllm_rt HF modules",
                                 "linears F.linear", "linears ops.linear"], args.sizes), flush=True)
    info["load_average_after"] = os.getloadavg()
    print(f"machine: {info['cpu']} (AVX-512: {info['avx512']}), torch {torch.__version__}, load average "
          f"{info['load_average'][0]:.2f} before, {info['load_average_after'][0]:.2f} after")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=info, settings=vars(args), results=results), f, indent=1)


if __name__ == "__main__":
    main()
