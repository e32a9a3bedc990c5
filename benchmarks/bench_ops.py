"""Benchmark cllm_rt's native ops against their PyTorch references.

    python benchmarks/bench_ops.py [--quick] [--threads 2] [--clock wall|process]
                                   [--device cpu|cuda|all] [--json PATH]

Each case times its variants in interleaved rounds (the order shuffled every
round, so drift on a shared machine hits all variants alike) after warm-up
rounds, and reports the median per variant. CPU cases run with
torch.set_num_threads(--threads), default 2 (the cores of the development
machine); --clock process times CPU work instead of latency, which other load
on a shared machine barely disturbs (with --threads 1 it is the single-core
latency). CUDA cases time with events after synchronizing.
block_attention and tree_attention are also compared with scaled_dot_product_attention
given an explicit boolean mask and K/V heads repeated to Hq (what a model without a
GQA-aware kernel does); block_attention's mask is built inside the timing, a tree's
outside (a model builds it once per step and reuses it in every layer). Trees are random
(each node extends its predecessor or hangs off an earlier node), n = 64 nodes.
"""
import argparse
import json
import random
import statistics
import time

import torch
import torch.nn.functional as F

from cllm_rt import ops


def _timer(device, clock="wall"):
    if device.type == "cuda":
        def run(fn):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop)
    else:
        now = time.process_time if clock == "process" else time.perf_counter

        def run(fn):
            start = now()
            fn()
            return (now() - start) * 1e3
    return run


def compare(variants, device, warmup, rounds, clock="wall"):
    """Median milliseconds of each variant, timed in shuffled interleaved rounds."""
    run = _timer(device, clock)
    names = list(variants)
    times = {name: [] for name in names}
    for round_ in range(warmup + rounds):
        random.shuffle(names)
        for name in names:
            elapsed = run(variants[name])
            if round_ >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}


def sdpa_repeated_kv(q, k_cache, v_cache, visible):
    """SDPA over the first L = visible.shape[-1] cache positions with K/V heads repeated and
    the explicit boolean mask visible [B, n, L]."""
    L = visible.shape[-1]
    group = q.shape[1] // k_cache.shape[1]
    k = k_cache[:, :, :L].repeat_interleave(group, dim=1)
    v = v_cache[:, :, :L].repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None])


def causal_mask(cache_lens, n):
    """[B, n, L]: query i of row b sees positions 0 .. cache_lens[b] + i; L = max + n."""
    L = int(cache_lens.max()) + n
    last = cache_lens.view(-1, 1, 1) + torch.arange(n, device=cache_lens.device).view(1, n, 1)
    return torch.arange(L, device=cache_lens.device) <= last


def tree_mask(cache_lens, parents):
    """[B, n, L]: node i sees the cache and the block positions of itself and its ancestors."""
    B, n = parents.shape
    L = int(cache_lens.max()) + n
    positions = torch.arange(L, device=parents.device)
    visible = (positions < cache_lens.view(B, 1, 1)).expand(B, n, L).clone()
    block = cache_lens.view(B, 1) + torch.arange(n, device=parents.device)
    return visible.scatter_(2, block[:, None, :].expand(B, n, n), ops.tree_ancestors(parents))


def random_parents(B, n, device):
    """Each node extends its predecessor (half the time) or hangs off a random earlier node."""
    i = torch.arange(n, device=device)
    earlier = (torch.rand(B, n, device=device) * i).long()
    parents = torch.where(torch.rand(B, n, device=device) < 0.5, i - 1, earlier)
    parents[:, 0] = -1
    return parents


def copy_bandwidth_gbs(device):
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = compare({"copy": lambda: dst.copy_(src)}, device, warmup=3, rounds=20)["copy"]
    return 2 * src.numel() / ms / 1e6


def jacobi_verify_cases(device, quick):
    shapes = [(8, 32, 32000), (2, 16, 32000)]
    cases = [(s, dt) for s in shapes for dt in (torch.float32, torch.bfloat16)]
    if device.type == "cuda" and not quick:
        cases.append(((8, 32, 128256), torch.bfloat16))
    for shape, dtype in cases:
        logits = torch.randn(shape, device=device).to(dtype)
        block = torch.randint(0, shape[2], shape[:2], device=device)
        yield ("jacobi_verify", shape, dtype, None, {
            "native": lambda: ops.jacobi_verify(logits, block),
            "reference": lambda: ops.jacobi_verify_reference(logits, block),
        })


def block_attention_cases(device, quick):
    Hq, Hkv, D = 32, 8, 128
    grid = [(B, n, c, torch.float32) for B in (1, 8) for n in (16, 32) for c in (1024, 2048)]
    if quick:
        grid = [(1, 16, 1024, torch.float32), (8, 32, 2048, torch.float32)]
    if device.type == "cuda":
        grid.append((8, 16, 4096, torch.bfloat16))
    for B, n, cache, dtype in grid:
        # q as a model produces it: a [B, Hq, n, D] view of [B, n, Hq, D].
        q = torch.randn(B, n, Hq, D, device=device).to(dtype).transpose(1, 2)
        k = torch.randn(B, Hkv, cache + n, D, device=device).to(dtype)
        v = torch.randn(B, Hkv, cache + n, D, device=device).to(dtype)
        lens = torch.full((B,), cache, device=device, dtype=torch.int32)
        kv_bytes = 2 * k.numel() * k.element_size()
        yield ("block_attention", (B, Hq, Hkv, n, cache, D), dtype, kv_bytes, {
            "native": lambda: ops.block_attention(q, k, v, lens),
            "reference": lambda: ops.block_attention_reference(q, k, v, lens),
            "sdpa": lambda: sdpa_repeated_kv(q, k, v, causal_mask(lens, n)),
        })


def tree_attention_cases(device, quick):
    Hq, Hkv, D, n = 32, 8, 128, 64
    grid = [(B, c, torch.float32) for B in (1, 8) for c in (1024, 2048)]
    if quick:
        grid = [(1, 1024, torch.float32)]
    if device.type == "cuda":
        grid.append((8, 4096, torch.bfloat16))
    for B, cache, dtype in grid:
        q = torch.randn(B, n, Hq, D, device=device).to(dtype).transpose(1, 2)
        k = torch.randn(B, Hkv, cache + n, D, device=device).to(dtype)
        v = torch.randn(B, Hkv, cache + n, D, device=device).to(dtype)
        lens = torch.full((B,), cache, device=device, dtype=torch.int32)
        parents = random_parents(B, n, device)
        visible = tree_mask(lens, parents)
        kv_bytes = 2 * k.numel() * k.element_size()
        yield ("tree_attention", (B, Hq, Hkv, n, cache, D), dtype, kv_bytes, {
            "native": lambda: ops.tree_attention(q, k, v, lens, parents),
            "reference": lambda: ops.tree_attention_reference(q, k, v, lens, parents),
            "sdpa": lambda: sdpa_repeated_kv(q, k, v, visible),
        })


def tree_verify_cases(device, quick):
    for B in (1, 8) if not quick else (8,):
        n = 64
        parents = random_parents(B, n, device)
        greedy = torch.randint(0, 3, (B, n), device=device)
        tokens = torch.randint(0, 3, (B, n), device=device)
        yield ("tree_verify", (B, n), torch.int64, None, {
            "native": lambda: ops.tree_verify(greedy, tokens, parents),
            "reference": lambda: ops.tree_verify_reference(greedy, tokens, parents),
        })


def lm_head_argmax_cases(device, quick):
    V, d = 32000, 1024
    grid = [((1, 16), torch.float32)] if quick else [
        ((1, 16), torch.float32), ((8, 32), torch.float32), ((1, 16), torch.bfloat16)]
    for (B, n), dtype in grid:
        hidden = torch.randn(B, n, d, device=device).to(dtype)
        weight = (torch.randn(V, d, device=device) / d ** 0.5).to(dtype)
        yield ("lm_head_argmax", (B, n, d, V), dtype, None, {
            "native": lambda: ops.lm_head_argmax(hidden, weight),
            "reference": lambda: ops.lm_head_argmax_reference(hidden, weight),
        })


def linear_cases(device, quick):
    """SmolLM2's gate/up projections (2 x 1,536 x 576) for a step's rows: ours against torch's (cuBLAS on a GPU),
    ours with the tuning the decoding step uses (ops.linear_plan)."""
    if device.type == "cpu" and ops.native_available():
        ops.linear_plan(torch.float32)
    for rows in (1, 8) if quick else (1, 4, 8, 16, 64):
        x = torch.randn(rows, 576, device=device)
        weights = [torch.randn(1536, 576, device=device) / 24 for _ in range(2)]
        yield ("linear", (rows, 576, 2 * 1536), torch.float32, None, {
            "native": lambda: ops.linear(x, weights),
            "reference": lambda: ops.linear_reference(x, weights, [None, None]),
        })


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="CPU timer: wall-clock latency, or process CPU time (the work "
                             "done by all threads, unaffected by other load on the machine)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)
    if not ops.native_available():
        print("warning: native extension not loaded; 'native' times the reference")
    devices = [] if args.device == "cuda" else [torch.device("cpu")]
    if args.device != "cpu" and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    warmup, rounds = (2, 5) if args.quick else (3, 15)

    results = []
    print(f"{'op':16} {'shape':28} {'dtype':9} {'dev':4} {'native ms':>10} {'ref ms':>9} "
          f"{'sdpa ms':>9} {'vs ref':>7} {'vs sdpa':>8} {'GB/s':>7}")
    for device in devices:
        copy_gbs = copy_bandwidth_gbs(device) if device.type == "cuda" else None
        for cases in (jacobi_verify_cases, block_attention_cases, tree_attention_cases,
                      tree_verify_cases, lm_head_argmax_cases, linear_cases):
            for op, shape, dtype, kv_bytes, variants in cases(device, args.quick):
                ms = compare(variants, device, warmup, rounds, args.clock)
                row = {"op": op, "shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
                       "device": device.type, "threads": args.threads, "clock": args.clock,
                       "median_ms": ms,
                       "speedup_vs_reference": ms["reference"] / ms["native"]}
                if "sdpa" in ms:
                    row["speedup_vs_sdpa"] = ms["sdpa"] / ms["native"]
                if kv_bytes is not None and device.type == "cuda":
                    row["kv_read_gbs"] = kv_bytes / ms["native"] / 1e6
                    row["copy_gbs"] = copy_gbs
                results.append(row)
                sdpa = f"{ms['sdpa']:9.3f}" if "sdpa" in ms else f"{'':9}"
                vs_sdpa = f"{row['speedup_vs_sdpa']:7.2f}x" if "sdpa" in ms else f"{'':8}"
                gbs = f"{row['kv_read_gbs']:7.0f}" if "kv_read_gbs" in row else f"{'':7}"
                print(f"{op:16} {str(tuple(shape)):28} {row['dtype']:9} {device.type:4} "
                      f"{ms['native']:10.3f} {ms['reference']:9.3f} {sdpa} "
                      f"{row['speedup_vs_reference']:6.2f}x {vs_sdpa} {gbs}", flush=True)
        if copy_gbs is not None:
            print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
