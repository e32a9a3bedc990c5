"""Kernels for Jacobi decoding and token-tree verification: native ops from cllm_rt._C,
pure-PyTorch references.

Each public op validates its inputs first (so the native and the reference paths raise
the same ValueError/TypeError naming the argument) and then runs the native kernel when
the extension is loaded and supports the tensors' device, else the reference.
``*_reference`` functions are the specification the kernels are tested against.

What each op accepts is defined once, by the C++ checks (csrc/checks.h); the checks
here test the same conditions with messages that name the Python argument. Checks of
*values* (cache_lens, parents) run in C++ on the native path, which on a GPU does them
with one host sync per tensor instead of one per call (csrc/checks.cpp), and here
with the same messages on the reference path.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import platform
import time
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .cache_dir import cache_dir

def _load_extension():
    """cllm_rt._C, or None with a warning that says why: not built (the usual case: a source checkout
    without an install) or built but not loadable (then the loader's own message)."""
    import importlib.util

    if importlib.util.find_spec("cllm_rt._C") is None:
        warnings.warn("cllm_rt: the native extension is not built; using the PyTorch reference ops. Build it "
                      "with `pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`)",
                      RuntimeWarning, stacklevel=3)
        return None
    try:
        from cllm_rt import _C  # registers torch.ops.cllm_rt.*; needs torch imported first
    except ImportError as error:
        warnings.warn(f"cllm_rt: the native extension failed to load ({error}); using the PyTorch reference "
                      "ops. Rebuild it against this torch with `pip install --no-build-isolation -e .`",
                      RuntimeWarning, stacklevel=3)
        return None
    return _C


_C = _load_extension()

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INT32_MAX = 2**31 - 1
# Limits of the kernels (csrc/common.h); the references have none, so without the
# extension there is no limit to check.
MAX_HEAD_DIM = _C.MAX_HEAD_DIM if _C is not None else None
MAX_TREE_NODES = _C.MAX_TREE_NODES if _C is not None else None
# A paged KV cache's page size must be a multiple of this (the CUDA kernel's key tile).
PAGE_SIZE_MULTIPLE = _C.PAGE_SIZE_MULTIPLE if _C is not None else None

# The fused LM-head argmax pays off from about 8 rows (B*n) on: on the 2-core development CPU
# (benchmarks/bench_head.py, vocab 32k and 128k, d=1024) it was 1.4-4.8x faster than linear + jacobi_verify
# at 8-128 rows and 0.23-0.9x at one row, where torch's GEMV streams the weight faster. It is not yet
# measured on GPUs, so CUDA keeps cuBLAS + jacobi_verify.
FUSED_HEAD_MIN_ROWS = 8


@functools.cache
def cpu_has_amx_bf16() -> bool:
    """True on CPUs with AMX bf16 tiles (Linux's cpuinfo flag ``amx_bf16``), where torch's bf16 GEMM outruns
    the fused LM-head argmax at every row count: SmolLM2's 49,152 x 576 head on a Xeon (family 6 model 207),
    1 thread, 9.1 vs 17.0 ms at 8 rows and 31 vs 67 ms at 64 (the float32 head still favours the fused kernel
    at 8 rows there: 24.8 vs 36.4 ms)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in cpuinfo)
    except OSError:
        return False

# float32/float64 linears of LINEAR_MIN_ROWS to LINEAR_MAX_ROWS rows run faster through ops.linear, which reads each
# weight once for all rows, than through torch, whose small-row GEMM re-reads the weights per row. SmolLM2's 30
# layers and head, float32, Intel Xeon family 6 model 106, torch vs ops.linear, 1 thread: 42 vs 47 ms at 1 row,
# 57 vs 60 at 3, 81 vs 56 at 4, 107 vs 57 at 8, 98 vs 78 at 16, 116 vs 115 at 24, 122-130 vs 131-174 at 32 (two
# runs); 2 threads: 28 vs 34 at 1, 32 vs 35 at 3, 67 vs 36 at 4, 79 vs 40 at 8, 141 vs 59 at 16, 165 vs 100 at 32.
# An AVX2 build (4-row tiles; -march=haswell on the same machine, torch at ATEN_CPU_CAPABILITY=avx2, 1 thread):
# 42 vs 48 at 1, 48 vs 49 at 3, 77 vs 50 at 4, 109 vs 66 at 8, 102 vs 102 at 16, 113 vs 148 at 24.
# Below LINEAR_MIN_ROWS (a one-token step, a tree of 2-3 nodes) the winner depends on the CPU: on an AMD EPYC
# family 26 (Zen 5) ops.linear won at every row count (1 thread: 31 vs 26 ms at 1 row, 48 vs 23 at 2, 61 vs 21
# at 3; 2 threads, where torch's one-row GEMV stays on one thread: 31 vs 16, 48 vs 15, 63 vs 15), so those rows
# are measured on the machine at hand (:func:`linear_plan`), and so is one tree's row count (_PREFETCH_ROWS), which
# decides the rows from LINEAR_MIN_ROWS on: the CPUs above have never lost there, but a new one might.
LINEAR_MIN_ROWS = 4
LINEAR_MAX_ROWS = 24 if getattr(_C, "AVX512", 0) else 16
# ops.linear takes a small-row call only when it measured at least this much faster than torch's: a near tie,
# where a rerun of the measurement could decide either way, stays with torch.
_SMALL_ROW_MARGIN = 0.9
# The kernel prefetches its next weight tile into L2 only when that measured at least this much faster than
# non-temporally: what non-temporal prefetches save the rest of a decoding step (the KV cache and activations
# left in L2: 8 % of a SmolLM2 step on a Zen 5) does not show in a linear-only measurement. Not more: at 0.8 an
# Intel Xeon with AMX (family 6 model 167) chose bf16's target at 8 rows by noise (L2 at 0.67-0.82 of
# non-temporal from run to run), and non-temporal then doubled its steps of 4-8 tokens; AMD's Zen 4 measured
# 0.65-0.69 or 1.03-1.10 in every run.
_PREFETCH_L2_MARGIN = 0.9
# The row count at which a tree's forward is measured: the prefetch target of calls of 3 rows and more, and
# whether ops.linear pays there.
_PREFETCH_ROWS = 8
# Plans measured by an earlier _measure_plan are measured again (part of the plan file's name).
_PLAN_METHOD = 5
# The prefetch targets the plan times, by the names its medians carry, and what each tells the kernel (to_l2).
_PREFETCH_TARGETS = {"non-temporal": False, "l2": True}
# The tile shapes the kernel can give calls of one or two rows, in csrc/cpu/linear.h's FewRowTiles order; "paired"
# (one row computed as two) applies to one-row calls only.
TILE_SHAPES = ("wide", "tall", "streamed", "paired")
_TWO_ROW_SHAPES = TILE_SHAPES[:3]
# A shape other than the wide tiles is taken only where it measured at least this much faster than them: a near tie
# on the plan's weights went either way on SmolLM2's (bf16, Zen 4: streamed rows 1.86 vs wide 1.95 ms on the plan's
# set, 16.5 vs 15.4 ms in the decoding step).
_TILE_MARGIN = 0.9


class LinearPlan(NamedTuple):
    """What :func:`linear_plan` measured for one dtype and thread count: whether ops.linear prefetches its next
    weight tile into L2 rather than non-temporally (csrc/cpu/linear.h) in calls of 1 row, of 2 rows and of more
    (``prefetch_l2``), its tile shape (of TILE_SHAPES) at 1 and at 2 rows (``tiles``; "paired" at 1 only),
    whether ops.linear then beats torch's linear at 1 .. LINEAR_MIN_ROWS - 1 rows (``pays[rows - 1]``) and at a
    tree's _PREFETCH_ROWS rows (``tree_pays``), and the medians behind it (``ms``: name -> ms)."""
    prefetch_l2: tuple[bool, bool, bool]
    tiles: tuple[str, str]
    pays: tuple[bool, ...]
    tree_pays: bool
    ms: dict


def linear_plan(dtype: torch.dtype) -> LinearPlan:
    """The CPU linear route and tuning for ``dtype`` at the current torch thread count (see
    :func:`_measure_plan`), measured once per machine and kept in the cache directory (:func:`_plan_file`), so
    that every process on a machine routes alike and float32 results do not depend on which process ran; also
    sets ops.linear's prefetch and tile choices for ``dtype`` to the faster ones. Delete the file to measure
    again."""
    if _C is None:
        raise RuntimeError("linear_plan measures the native linear kernel: build the extension first")
    if dtype not in (torch.float32, torch.float64, torch.bfloat16):
        raise ValueError(f"linear_plan: dtype must be float32, float64 or bfloat16, got {dtype}")
    return _plan_in_force(dtype)


def _plan_in_force(dtype: torch.dtype) -> LinearPlan:
    """linear_plan without its checks, for every routed call: sets the kernel's tuning only when it changes."""
    plan = _cached_plan(dtype, torch.get_num_threads())
    if _tuning_set.get(dtype) != (plan.tiles, plan.prefetch_l2):
        _set_tuning(dtype, plan.tiles, plan.prefetch_l2)
    return plan


_tuning_set: dict = {}  # dtype -> (tiles, prefetch_l2): what the kernel was last told


def _set_tuning(dtype: torch.dtype, tiles: tuple[str, str], prefetch_l2: tuple[bool, bool, bool]) -> None:
    """Tells the kernel ``tiles`` (at 1 and 2 rows; "paired" at 2 rows is the wide tiles) and the prefetch targets
    (at 1 row, 2 rows, more)."""
    one_row, two_rows = tiles
    _C.set_linear_tuning(str(dtype).removeprefix("torch."), TILE_SHAPES.index(one_row),
                         TILE_SHAPES.index("wide" if two_rows == "paired" else two_rows), tuple(prefetch_l2))
    _tuning_set[dtype] = (tuple(tiles), tuple(prefetch_l2))


def _plan_file(dtype: torch.dtype, threads: int) -> pathlib.Path:
    """``linear-plans/<machine>-<dtype>-<threads>t.json`` under :func:`cllm_rt.cache_dir.cache_dir`; <machine>
    hashes the CPU (model, family, flags), the torch version and the extension's build, which is what the
    measurement depends on."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:  # the first processor's block
            cpu = cpuinfo.read().split("\n\n")[0]
        cpu = "\n".join(line for line in cpu.splitlines() if line.split(":")[0].strip() in
                        ("vendor_id", "cpu family", "model", "model name", "stepping", "flags"))
    except OSError:
        cpu = platform.processor()
    # the extension file's size and time: a rebuilt kernel (a new install) is measured again
    binary = os.stat(_C.__file__)
    build = (torch.__version__, getattr(_C, "AVX512", 0), getattr(_C, "BF16_PAIR_DOT", 0), LINEAR_MIN_ROWS,
             binary.st_size, binary.st_mtime_ns, _PLAN_METHOD)
    machine = hashlib.sha256(f"{cpu}|{build}".encode()).hexdigest()[:16]
    name = str(dtype).removeprefix("torch.")
    return cache_dir() / "linear-plans" / f"{machine}-{name}-{threads}t.json"


def _read_plan(path: pathlib.Path) -> LinearPlan:
    fields = json.loads(path.read_text())
    tiles, prefetch_l2 = tuple(fields["tiles"]), tuple(map(bool, fields["prefetch_l2"]))
    if len(tiles) != 2 or tiles[0] not in TILE_SHAPES or tiles[1] not in _TWO_ROW_SHAPES:
        raise ValueError(f"unknown tile shapes {tiles}")
    if len(prefetch_l2) != 3:
        raise ValueError(f"prefetch targets for 1 row, 2 rows and more expected, got {prefetch_l2}")
    return LinearPlan(prefetch_l2, tiles, tuple(map(bool, fields["pays"])),
                      bool(fields["tree_pays"]), dict(fields["ms"]))


@functools.cache
def _cached_plan(dtype: torch.dtype, threads: int) -> LinearPlan:
    """The plan kept for this machine, else measured now and kept. Processes measuring at once (a torchrun
    launch) each measure; the first to publish its file wins and the others read it back."""
    path = _plan_file(dtype, threads)
    try:
        return _read_plan(path)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    plan = _measure_plan(dtype)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        scratch.write_text(json.dumps(plan._asdict()))
        try:
            if path.exists():  # unreadable (above): ours replaces it
                os.replace(scratch, path)
            else:
                os.link(scratch, path)  # fails if another process published first
        except FileExistsError:
            pass
        finally:
            scratch.unlink(missing_ok=True)
        return _read_plan(path)
    except (OSError, ValueError, KeyError, TypeError):
        return plan  # no writable cache: this process's own measurement


def _prefetch_target(ms: dict, call: str) -> str:
    """Where ``call`` (a shape and row count, measured with each target in ``ms``: name -> ms) prefetches: "l2"
    where that measured _PREFETCH_L2_MARGIN faster, else "non-temporal"."""
    return "l2" if ms[f"{call} l2"] < _PREFETCH_L2_MARGIN * ms[f"{call} non-temporal"] else "non-temporal"


def _with_its_target(ms: dict, call: str) -> float:
    """``call``'s median in ``ms`` with its prefetch target (:func:`_prefetch_target`)."""
    return ms[f"{call} {_prefetch_target(ms, call)}"]


def _fastest_shape(ms: dict, rows: int, shapes: tuple[str, ...]) -> str:
    """The fastest of ``shapes`` at ``rows`` rows in ``ms``, each with its prefetch target, the wide tiles unless
    another is _TILE_MARGIN faster."""
    best = min(shapes, key=lambda shape: _with_its_target(ms, f"{shape} {rows}"))
    fastest = _with_its_target(ms, f"{best} {rows}")
    return best if fastest < _TILE_MARGIN * _with_its_target(ms, f"wide {rows}") else "wide"


def _last_level_cache_bytes(caches: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """The largest CPU cache Linux reports for CPU 0 in ``caches`` (0 where it reports none)."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    sizes = [0]
    for index in pathlib.Path(caches).glob("index*"):
        try:
            size = (index / "size").read_text().strip()
            sizes.append(int(size[:-1]) * units[size[-1]] if size[-1:] in units else int(size))
        except (OSError, ValueError):  # unreadable, empty or not a size
            pass
    return max(sizes)


def _measure_plan(dtype: torch.dtype) -> LinearPlan:
    """Times ops.linear's wide tiles with either prefetch target at _PREFETCH_ROWS rows (the target of every call of
    3 rows and more), then its tile shapes at 1 and 2 rows with either target (which target is faster can differ
    from shape to shape on one machine: csrc/cpu/linear.cpp), its wide tiles at LINEAR_MIN_ROWS - 1 with the first's
    target, and torch's linear at 1 .. LINEAR_MIN_ROWS - 1 rows and at _PREFETCH_ROWS. Each call runs a decoder's
    worth of layer-sized weights (SmolLM2's MLP matrix, 1536 x 576): the two halves of a set in turn, each half the
    size of the last-level cache (at least 32 MiB, at most 512 MiB: up to 1 GiB allocated while it measures), so
    every call streams its weights from memory as a decoding step does. One large weight did not stand for a model:
    on a Xeon with AMX (family 6 model 167) it measured torch's bf16 linear ahead at 8 rows (30 vs 31 ms), where on
    SmolLM2's layers and on this set ops.linear is (43 vs 37 ms; 87 vs 71). Medians of 11 interleaved calls: with 5,
    a drifting host's noise picked another one-row shape from run to run (an AMD EPYC Zen 4, 32 MiB of L3, where 12
    calls a round took ~0.5 s a dtype); the 19 a round now take 9-20 s a dtype on that Xeon's 480 MiB (1 and 2
    threads)."""
    N, K = 1536, 576

    def matrix_set(half_bytes: int) -> tuple[torch.Tensor, ...]:
        return torch.full((2 * half_bytes // (N * K * dtype.itemsize) + 2, N, K), 0.5, dtype=dtype).unbind()

    try:
        matrices = matrix_set(min(max(32 * 2**20, _last_level_cache_bytes()), 512 * 2**20))
    except (RuntimeError, MemoryError):  # no memory for that many: the smallest set, which may hit in cache
        matrices = matrix_set(32 * 2**20)
    count = len(matrices)
    weights = [matrices[: count // 2], matrices[count // 2:]]
    inputs = {rows: torch.full((rows, K), 0.25, dtype=dtype)
              for rows in (*range(1, LINEAR_MIN_ROWS), _PREFETCH_ROWS)}

    def medians(candidates: dict) -> dict:
        times = {key: [] for key in candidates}
        with torch.inference_mode():
            for round_ in range(12):  # the first round warms up
                for call, (key, run) in enumerate(candidates.items()):
                    start = time.perf_counter()
                    run(weights[(round_ * len(candidates) + call) % 2])  # never the half the last call read
                    if round_:
                        times[key].append((time.perf_counter() - start) * 1e3)
        return {key: sorted(t)[len(t) // 2] for key, t in times.items()}

    def ours(rows: int, tiles: str = "wide", prefetch_l2: bool = False):
        def run(half):
            _set_tuning(dtype, (tiles, tiles), (prefetch_l2,) * 3)
            for weight in half:
                torch.ops.cllm_rt.linear(inputs[rows], [weight], [None])
        return run

    def torch_linear(rows: int):
        def run(half):
            for weight in half:
                F.linear(inputs[rows], weight)
        return run

    tree = f"wide {_PREFETCH_ROWS}"
    ms = medians({f"{tree} {target}": ours(_PREFETCH_ROWS, prefetch_l2=l2) for target, l2 in _PREFETCH_TARGETS.items()})
    more_rows_l2 = _PREFETCH_TARGETS[_prefetch_target(ms, tree)]
    # the shapes apply to 1 and 2 rows only, so 3 rows always take wide tiles
    candidates = {f"{tiles} {rows} {target}": ours(rows, tiles, l2) for rows in (1, 2)
                  for tiles in (TILE_SHAPES if rows == 1 else _TWO_ROW_SHAPES)
                  for target, l2 in _PREFETCH_TARGETS.items()}
    candidates[f"wide {LINEAR_MIN_ROWS - 1}"] = ours(LINEAR_MIN_ROWS - 1, "wide", more_rows_l2)
    candidates.update({f"torch {rows}": torch_linear(rows) for rows in (*range(1, LINEAR_MIN_ROWS), _PREFETCH_ROWS)})
    ms |= medians(candidates)
    tiles = tuple(_fastest_shape(ms, rows, TILE_SHAPES if rows == 1 else _TWO_ROW_SHAPES) for rows in (1, 2))
    prefetch_l2 = (*(_PREFETCH_TARGETS[_prefetch_target(ms, f"{shape} {rows}")] for rows, shape in enumerate(tiles, 1)),
                   more_rows_l2)

    def ours_at(rows: int) -> float:
        return _with_its_target(ms, f"{tiles[rows - 1]} {rows}") if rows <= 2 else ms[f"wide {rows}"]

    pays = tuple(ours_at(rows) < _SMALL_ROW_MARGIN * ms[f"torch {rows}"] for rows in range(1, LINEAR_MIN_ROWS))
    tree_pays = _with_its_target(ms, tree) < _SMALL_ROW_MARGIN * ms[f"torch {_PREFETCH_ROWS}"]
    return LinearPlan(prefetch_l2, tiles, pays, tree_pays, ms)


def linear_pays(x: torch.Tensor) -> bool:
    """Whether a linear layer over ``x`` [..., K] is faster through :func:`linear` than through torch's, on a CPU,
    as :func:`linear_plan` measured on this machine: float32/float64/bf16 calls of 1 .. LINEAR_MIN_ROWS - 1 rows
    as measured at each count, and of LINEAR_MIN_ROWS to LINEAR_MAX_ROWS rows (a token tree's or a batch's
    forward) where it measured ops.linear faster at _PREFETCH_ROWS; bf16 on a CPU with AMX only up to
    _PREFETCH_ROWS rows, as torch's AMX GEMM costs nearly the same from 1 to 32 rows (SmolLM2's layers and head,
    Xeon family 6 model 167, 1 thread, torch vs ops.linear: 43.7 vs 28.2 ms at 4 rows, 43.2 vs 36.8 at 8, 44.1
    vs 62.2 at 16)."""
    if not (x.device.type == "cpu" and _native_kernels_enabled and _C is not None):
        return False
    rows = x.shape[:-1].numel()
    if x.dtype not in (torch.float32, torch.float64, torch.bfloat16) or not 1 <= rows <= LINEAR_MAX_ROWS:
        return False
    plan = _plan_in_force(x.dtype)  # also sets the kernel's prefetch targets, which every row count uses
    if rows < LINEAR_MIN_ROWS:
        return plan.pays[rows - 1]
    if x.dtype == torch.bfloat16 and cpu_has_amx_bf16():
        return plan.tree_pays and rows <= _PREFETCH_ROWS
    return plan.tree_pays


def routed_linear(input: torch.Tensor, weights, biases) -> list[torch.Tensor]:
    """``[F.linear(input, w, b)]`` for each weight, as one :func:`linear` call where :func:`linear_pays`, else
    torch's linear per weight: what the decoding step's linear layers run. Calls the kernel without
    :func:`linear`'s Python checks (its own checks stay): ~3 us a call, a third of a millisecond a SmolLM2 step."""
    if linear_pays(input):
        return list(torch.ops.cllm_rt.linear(input, list(weights), list(biases)))
    return [F.linear(input, w, b) for w, b in zip(weights, biases)]


_native_kernels_enabled = True


def native_available() -> bool:
    """True when the compiled extension cllm_rt._C is loaded."""
    return _C is not None


def use_native_kernels(enabled: bool) -> None:
    """Route the ops to the compiled kernels (default) or to the PyTorch references, e.g. to compare them."""
    global _native_kernels_enabled
    _native_kernels_enabled = bool(enabled)


def native_kernel_for(device: torch.device) -> bool:
    """Whether the ops run a compiled kernel for tensors on ``device`` (else the reference)."""
    if not _native_kernels_enabled or _C is None:
        return False
    # A CPU-only build has no CUDA kernels: the reference takes CUDA tensors.
    return device.type == "cpu" or (device.type == "cuda" and bool(_C.WITH_CUDA))


# ---------------------------------------------------------------- validation

def _check_tensor(name, x, ndim, dtypes):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {x.dtype}")


def _check_same_device(name, x, ref_name, ref):
    if x.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {x.device}")


def _check_index_matrix(name, x, shape, ref_name, ref):
    """x: int64 [B, n] on ref's device."""
    _check_tensor(name, x, 2, (torch.int64,))
    _check_same_device(name, x, ref_name, ref)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape [B, n] = {tuple(shape)}, got {tuple(x.shape)}")


def _check_jacobi_verify(logits, block):
    _check_tensor("logits", logits, 3, _FLOAT_DTYPES)
    _check_index_matrix("block", block, logits.shape[:2], "logits", logits)
    if logits.shape[1] == 0 or not 0 < logits.shape[2] < _INT32_MAX:
        raise ValueError(f"logits must have n >= 1 and 1 <= V < 2**31 - 1, got shape {tuple(logits.shape)}")


def _check_attention(q, k_cache, v_cache, cache_lens, page_table=None) -> int:
    """The attention ops' arguments (see block_attention); returns S_max, the positions a row can hold."""
    _check_tensor("q", q, 4, _FLOAT_DTYPES)
    layout = "[B, Hkv, S_max, D]" if page_table is None else "[num_pages, Hkv, page_size, D]"
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, x, 4, (q.dtype,))
        _check_same_device(name, x, "q", q)
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    B, Hq, n, D = q.shape
    Hkv, S_max = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[3] != D or (page_table is None and k_cache.shape[0] != B):
        raise ValueError(f"k_cache must be {layout} with q's {'D' if page_table is not None else 'B and D'}, "
                         f"got {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, "
                         f"got {tuple(v_cache.shape)}")
    if Hq == 0 or Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q's head count {Hq} must be a positive multiple of k_cache's {Hkv}")
    if n == 0 or D == 0 or (MAX_HEAD_DIM is not None and D > MAX_HEAD_DIM):
        raise ValueError(f"q must have n >= 1 and 1 <= D{_at_most(MAX_HEAD_DIM)}, "
                         f"got shape {tuple(q.shape)}")
    if page_table is not None:
        if k_cache.shape[0] == 0 or S_max == 0 or S_max % (PAGE_SIZE_MULTIPLE or 1):
            raise ValueError(f"a paged k_cache needs num_pages >= 1 and a page_size that is a multiple of "
                             f"{PAGE_SIZE_MULTIPLE or 1}, got {tuple(k_cache.shape)}")
        _check_tensor("page_table", page_table, 2, (torch.int64,))
        _check_same_device("page_table", page_table, "q", q)
        if page_table.shape[0] != B or page_table.shape[1] == 0:
            raise ValueError(f"page_table must be [B = {B}, pages_per_row >= 1], got {tuple(page_table.shape)}")
        S_max *= page_table.shape[1]
    if S_max < n:
        raise ValueError(f"the cache's S_max = {S_max} must be at least the block length n = {n}")
    _check_tensor("cache_lens", cache_lens, 1, (torch.int32, torch.int64))
    _check_same_device("cache_lens", cache_lens, "q", q)
    if cache_lens.shape[0] != B:
        raise ValueError(f"cache_lens must have shape [B={B}], got {tuple(cache_lens.shape)}")
    return S_max


def _at_most(limit):
    return "" if limit is None else f" <= {limit}"


def _check_tree_nodes(op, n):
    if n == 0 or (MAX_TREE_NODES is not None and n > MAX_TREE_NODES):
        raise ValueError(f"{op}: a tree must have 1 <= n{_at_most(MAX_TREE_NODES)} nodes, got n = {n}")


def _check_tree_attention(q, k_cache, v_cache, cache_lens, parents, page_table=None) -> int:
    S_max = _check_attention(q, k_cache, v_cache, cache_lens, page_table)
    _check_tree_nodes("tree_attention", q.shape[2])
    _check_index_matrix("parents", parents, (q.shape[0], q.shape[2]), "q", q)
    return S_max


def _check_tree_verify(greedy, tokens, parents):
    _check_tensor("greedy", greedy, 2, (torch.int64,))
    _check_tree_nodes("tree_verify", greedy.shape[1])
    _check_index_matrix("tokens", tokens, greedy.shape, "greedy", greedy)
    _check_index_matrix("parents", parents, greedy.shape, "greedy", greedy)


def _check_lm_head_argmax(hidden, weight):
    _check_tensor("hidden", hidden, 3, _FLOAT_DTYPES)
    _check_tensor("weight", weight, 2, (hidden.dtype,))
    if weight.shape[1] != hidden.shape[2] or not 0 < weight.shape[0] < _INT32_MAX:
        raise ValueError(f"weight must have shape [V, d={hidden.shape[2]}] with 1 <= V < 2**31 - 1, "
                         f"got {tuple(weight.shape)}")
    _check_same_device("weight", weight, "hidden", hidden)


def _check_linear(input, weights, biases):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() == 0 or input.shape[-1] == 0 or input.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"input must be a float tensor [..., K] with K >= 1, got {input.dtype} of shape "
                         f"{tuple(input.shape)}")
    if len(weights) == 0 or len(biases) != len(weights):
        raise ValueError(f"linear needs at least one weight and one bias entry (a tensor or None) per weight, "
                         f"got {len(weights)} weights and {len(biases)} biases")
    for i, (w, b) in enumerate(zip(weights, biases)):
        _check_linear_weight(i, w, input, (input.dtype,))
        if b is not None:
            _check_per_output_row(f"biases[{i}]", b, w, input)


def _check_linear_weight(i: int, w, input, dtypes) -> None:
    """weights[i] of a linear op: a [N, K] tensor of ``dtypes`` on input's device, K input's last dimension."""
    _check_tensor(f"weights[{i}]", w, 2, dtypes)
    _check_same_device(f"weights[{i}]", w, "input", input)
    if w.shape[1] != input.shape[-1]:
        raise ValueError(f"weights[{i}] must have shape [N, K={input.shape[-1]}], got {tuple(w.shape)}")


def _check_per_output_row(name: str, x, w, input) -> None:
    """A bias or scale of weight ``w``: [N] of input's dtype, on input's device."""
    _check_tensor(name, x, 1, (input.dtype,))
    _check_same_device(name, x, "input", input)
    if x.shape[0] != w.shape[0]:
        raise ValueError(f"{name} must have shape [N={w.shape[0]}], got {tuple(x.shape)}")


def _check_linear_int8(input, weights, scales, biases):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"input must be a float32 or float64 tensor [..., K], got {input.dtype}")
    if input.dim() == 0 or input.shape[-1] == 0:
        raise ValueError(f"input must be [..., K] with K >= 1, got shape {tuple(input.shape)}")
    if len(weights) == 0 or not len(scales) == len(biases) == len(weights):
        raise ValueError(f"linear_int8 needs at least one weight, and one scale and one bias entry (a tensor or "
                         f"None) per weight, got {len(weights)} weights, {len(scales)} scales and {len(biases)} "
                         f"biases")
    for i, (w, scale, b) in enumerate(zip(weights, scales, biases)):
        _check_linear_weight(i, w, input, (torch.int8,))
        _check_per_output_row(f"scales[{i}]", scale, w, input)
        if b is not None:
            _check_per_output_row(f"biases[{i}]", b, w, input)


# Value checks of the reference path; the native path runs csrc/checks.cpp, whose
# conditions and messages these repeat.

def _check_cache_lens_values(op, cache_lens, n, S_max):
    if cache_lens.numel() == 0:
        return
    lo, hi = (int(x) for x in torch.aminmax(cache_lens))
    if lo < 0 or hi + n > S_max:
        raise ValueError(f"{op}: cache_lens must satisfy 0 <= cache_lens[b] and cache_lens[b] + n <= "
                         f"S_max = {S_max} (n = {n}), got values in [{lo}, {hi}]")


def _check_kv_values(op, cache_lens, n, S_max, page_table, num_pages):
    _check_cache_lens_values(op, cache_lens, n, S_max)
    if page_table is not None:
        _check_page_table_values(op, page_table, num_pages)


def _check_page_table_values(op, page_table, num_pages):
    if page_table.numel() == 0:
        return
    lo, hi = (int(x) for x in torch.aminmax(page_table))
    if lo < 0 or hi >= num_pages:
        raise ValueError(f"{op}: page_table must satisfy 0 <= page_table[b, j] < num_pages = {num_pages}, "
                         f"got values in [{lo}, {hi}]")


def _check_parents_values(op, parents):
    if parents.numel() == 0:
        return
    lo = int(parents.min())
    hi = int((parents - torch.arange(parents.shape[1], device=parents.device)).max())
    if lo < -1 or hi >= 0:
        raise ValueError(f"{op}: parents must satisfy -1 <= parents[b, i] < i (a forest in topological "
                         f"order, -1 for a root), got values down to {lo} and parents[b, i] - i up to {hi}")


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- references

def accepted_length(block, greedy):
    """1 + the largest k with block[b, 1:1+k] == greedy[b, :k]: the block prefix proven greedy, [B] int64."""
    # block[b, k+1] was guessed for the token greedy[b, k] predicts; accept the prefix.
    matches = (block[:, 1:] == greedy[:, :-1]).long()  # [B, n-1]
    return 1 + matches.cumprod(-1).sum(-1)


def jacobi_verify_reference(logits, block):
    greedy = logits.argmax(-1)  # [B, n]
    return greedy, accepted_length(block, greedy)


def _masked_attention_reference(q, k_cache, v_cache, visible, scale):
    """Softmax attention of q [B, Hq, n, D] over the cache positions where visible [B, n, S_max] holds."""
    B, Hq, n, D = q.shape
    Hkv = k_cache.shape[1]
    acc = _acc_dtype(q.dtype)
    scale = D ** -0.5 if scale is None else scale
    k = k_cache.to(acc).repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, S_max, D]
    v = v_cache.to(acc).repeat_interleave(Hq // Hkv, dim=1)
    scores = (q.to(acc) @ k.transpose(-1, -2)) * scale  # [B, Hq, n, S_max]
    probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
    return (probs @ v).to(q.dtype)


def unpage(cache, page_table):
    """A paged cache [num_pages, Hkv, page_size, D] as the dense [B, Hkv, S_max, D] that page_table
    [B, pages] describes (S_max = pages * page_size); a dense cache (page_table None) as it is."""
    if page_table is None:
        return cache
    B, pages = page_table.shape
    _, Hkv, page_size, D = cache.shape
    return cache[page_table].transpose(1, 2).reshape(B, Hkv, pages * page_size, D)


def block_attention_reference(q, k_cache, v_cache, cache_lens, scale=None, page_table=None):
    k_cache, v_cache = unpage(k_cache, page_table), unpage(v_cache, page_table)
    B, _, n, _ = q.shape
    S_max = k_cache.shape[2]
    last = cache_lens.view(B, 1, 1) + torch.arange(n, device=q.device).view(1, n, 1)
    visible = torch.arange(S_max, device=q.device) <= last  # [B, n, S_max]
    return _masked_attention_reference(q, k_cache, v_cache, visible, scale)


def tree_ancestors(parents):
    """[B, n, n] bool: [b, i, j] is True iff node j is node i or one of its ancestors."""
    B, n = parents.shape
    ancestors = torch.eye(n, dtype=torch.bool, device=parents.device).repeat(B, 1, 1)
    rows = torch.arange(B, device=parents.device)
    for i in range(1, n):  # topological order: a parent's row is final before its children's
        parent = parents[:, i]
        ancestors[:, i] |= ancestors[rows, parent.clamp(min=0)] & (parent >= 0)[:, None]
    return ancestors


def tree_attention_reference(q, k_cache, v_cache, cache_lens, parents, scale=None, page_table=None):
    k_cache, v_cache = unpage(k_cache, page_table), unpage(v_cache, page_table)
    B, _, n, _ = q.shape
    S_max = k_cache.shape[2]
    positions = torch.arange(S_max, device=q.device)
    visible = (positions < cache_lens.view(B, 1, 1)).expand(B, n, S_max).clone()  # the cache
    block = cache_lens.view(B, 1) + torch.arange(n, device=q.device)  # [B, n]: node j's position
    visible.scatter_(2, block[:, None, :].expand(B, n, n), tree_ancestors(parents))
    return _masked_attention_reference(q, k_cache, v_cache, visible, scale)


def tree_verify_reference(greedy, tokens, parents):
    B, n = greedy.shape
    rows = torch.arange(B, device=greedy.device)
    depth = torch.full((B, n), -1, dtype=torch.int64, device=greedy.device)  # -1: not confirmed
    depth[:, 0] = 0
    for i in range(1, n):
        parent = parents[:, i].clamp(min=0)
        confirmed = ((parents[:, i] >= 0) & (depth[rows, parent] >= 0)
                     & (tokens[:, i] == greedy[rows, parent]))
        depth[:, i] = torch.where(confirmed, depth[rows, parent] + 1, -1)
    node = depth.argmax(-1)  # argmax takes the first index: the smallest among the deepest
    accepted = depth[rows, node] + 1
    path = torch.full_like(greedy, -1)
    current, level = node, accepted - 1
    for _ in range(n):  # walk up from the deepest node; the root has level 0
        live = level >= 0
        path[rows[live], level[live]] = current[live]
        current, level = parents[rows, current].clamp(min=0), level - 1
    return accepted, node, path


def lm_head_argmax_reference(hidden, weight):
    acc = _acc_dtype(hidden.dtype)
    return (hidden.to(acc) @ weight.to(acc).T).argmax(-1)


def linear_reference(input, weights, biases):
    acc = _acc_dtype(input.dtype)
    return [(F.linear(input.to(acc), w.to(acc), None if b is None else b.to(acc))).to(input.dtype)
            for w, b in zip(weights, biases)]


def linear_int8_reference(input, weights, scales, biases):
    """The dequantized product in float64: (input @ q.T) * scale + bias, rounded to input's dtype."""
    return [((input.double() @ w.double().T) * scale.double() + (0 if b is None else b.double())).to(input.dtype)
            for w, scale, b in zip(weights, scales, biases)]


# ---------------------------------------------------------------- public ops

def jacobi_verify(logits: torch.Tensor, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and accepted lengths of a Jacobi block.

    logits [B, n, V] float, block [B, n] int64 (the tokens fed in) ->
    greedy [B, n] int64 == logits.argmax(-1) exactly, accepted [B] int64 =
    1 + the largest k with block[b, 1:1+k] == greedy[b, :k].
    """
    _check_jacobi_verify(logits, block)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if native_kernel_for(logits.device):
        return tuple(torch.ops.cllm_rt.jacobi_verify(logits, block))
    return jacobi_verify_reference(logits, block)


def block_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    cache_lens: torch.Tensor, scale: float | None = None,
                    page_table: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of a block of n queries against a ragged KV cache.

    q [B, Hq, n, D] (any strides), k_cache/v_cache [B, Hkv, S_max, D] contiguous with
    the block's own keys already at cache_lens[b] .. cache_lens[b]+n-1, cache_lens [B]
    int32/int64 with 0 <= cache_lens[b] <= S_max - n. Query i of row b attends to
    positions 0 .. cache_lens[b]+i; q head h uses KV head h // (Hq // Hkv); D <=
    MAX_HEAD_DIM. Returns [B, Hq, n, D] contiguous in q's dtype.

    Paged caches: with page_table int64 [B, pages], k_cache/v_cache are pages
    [num_pages, Hkv, page_size, D] (page_size a multiple of PAGE_SIZE_MULTIPLE) and row
    b's position s lies at page page_table[b, s // page_size], offset s % page_size;
    S_max = pages * page_size. Rows then own only the pages they use
    (:class:`cllm_rt.runtime.cache.JacobiCache`).
    """
    S_max = _check_attention(q, k_cache, v_cache, cache_lens, page_table)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if native_kernel_for(q.device):
        return torch.ops.cllm_rt.block_attention(q, k_cache, v_cache, cache_lens, scale, page_table)
    _check_kv_values("block_attention", cache_lens, q.shape[2], S_max, page_table, k_cache.shape[0])
    return block_attention_reference(q, k_cache, v_cache, cache_lens, scale, page_table)


def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   cache_lens: torch.Tensor, parents: torch.Tensor,
                   scale: float | None = None, page_table: torch.Tensor | None = None) -> torch.Tensor:
    """block_attention for a block whose n tokens form a token tree (or a forest).

    parents [B, n] int64: parents[b, i] is node i's parent, -1 for a root, and nodes are
    in topological order (-1 <= parents[b, i] < i; so node 0 is always a root, normally
    the last verified token). Node i's key/value is already at cache position
    cache_lens[b] + i. Node i of row b attends to cache positions 0 .. cache_lens[b]-1
    and to the block positions of itself and its ancestors; a chain (parents[b, i] =
    i - 1) is exactly block_attention. n <= MAX_TREE_NODES. Padding for rows with fewer
    nodes: make the padded nodes roots (parent -1); they attend to the cache and
    themselves, tree_verify never accepts them, and their outputs are to be ignored.
    Other arguments (dense or paged caches) and the result as in block_attention; the
    nodes' positions for rotary embeddings (cache_lens[b] + depth) are the caller's.
    """
    S_max = _check_tree_attention(q, k_cache, v_cache, cache_lens, parents, page_table)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if native_kernel_for(q.device):
        return torch.ops.cllm_rt.tree_attention(q, k_cache, v_cache, cache_lens, parents, scale, page_table)
    _check_kv_values("tree_attention", cache_lens, q.shape[2], S_max, page_table, k_cache.shape[0])
    _check_parents_values("tree_attention", parents)
    return tree_attention_reference(q, k_cache, v_cache, cache_lens, parents, scale, page_table)


def tree_verify(greedy: torch.Tensor, tokens: torch.Tensor,
                parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The longest path of a token tree that greedy decoding confirms.

    greedy [B, n] int64: the greedy token after node i (the argmax of node i's logits);
    tokens [B, n] int64: node i's token (tokens[b, 0], the root's, is the last verified
    token and is not compared); parents as in tree_attention (n <= MAX_TREE_NODES).
    Node 0 is confirmed; node i > 0 is confirmed iff its parent is and tokens[b, i] ==
    greedy[b, parents[b, i]]; other roots (padding) never are. Returns int64

    - node [B]: the deepest confirmed node, the smallest index among equally deep ones;
    - accepted [B] = depth(node) + 1: the tokens made final, i.e. the depth(node)
      confirmed tokens of the path plus greedy[b, node[b]], as jacobi_verify counts
      (a chain, parents[b, i] = i - 1, gives exactly accepted_length(tokens, greedy));
    - path [B, n]: path[b, k] for k < accepted[b] is the path's node at depth k (path[b, 0]
      = 0), -1 after. The cache keeps the keys/values at cache_lens[b] + path[b, k] as
      positions cache_lens[b] + k, k < accepted[b]; the next block starts with
      greedy[b, node[b]].

    as (accepted, node, path).
    """
    _check_tree_verify(greedy, tokens, parents)
    if native_kernel_for(greedy.device):
        return tuple(torch.ops.cllm_rt.tree_verify(greedy, tokens, parents))
    _check_parents_values("tree_verify", parents)
    return tree_verify_reference(greedy, tokens, parents)


def lm_head_argmax(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """argmax(hidden @ weight.T, -1) -> [B, n] int64, without the [B, n, V] logits.

    hidden [B, n, d], weight [V, d] of one dtype; products accumulate in float32
    (float64 for float64), so near-ties may differ from a product rounded to bf16.
    """
    _check_lm_head_argmax(hidden, weight)
    if native_kernel_for(hidden.device):
        return torch.ops.cllm_rt.lm_head_argmax(hidden.contiguous(), weight.contiguous())
    return lm_head_argmax_reference(hidden, weight)


def linear(input: torch.Tensor, weights, biases=None) -> list[torch.Tensor]:
    """[input @ weights[i].T + biases[i]] for several weights of one input [..., K] (e.g. q, k, v).

    weights [N_i, K] and biases ([N_i] or None; ``None`` for all: no biases) of input's dtype; products
    accumulate in float32 (float64 for float64). The CPU kernel reads each weight once for all rows, and a
    row's result does not depend on the other rows of the call (the same bits for 1 row or 64). It runs with the
    tile and prefetch choices last set for the input's dtype (the decoding step and int8 models set those
    :func:`linear_plan` measured; call it first to time this op as they run it); they never change a bit.
    """
    weights = list(weights)
    biases = [None] * len(weights) if biases is None else list(biases)
    _check_linear(input, weights, biases)
    if native_kernel_for(input.device):
        return list(torch.ops.cllm_rt.linear(input, weights, biases))
    return linear_reference(input, weights, biases)


def linear_int8(input: torch.Tensor, weights, scales, biases=None) -> list[torch.Tensor]:
    """[(input @ weights[i].T) * scales[i] + biases[i]] for int8 weights [N_i, K] with a scale per output row
    (:func:`cllm_rt.quantize.quantize_int8` makes them), of one float32 or float64 input [..., K].

    scales [N_i] and biases ([N_i] or None; ``None`` for all: no biases) of input's dtype; products accumulate in
    input's dtype. As :func:`linear`: the CPU kernel streams each weight tile once for all rows (converting it in
    registers once per pass of up to 8 rows), and a row's bits do not depend on the other rows of the call.
    Without a native kernel for the device, :func:`linear_int8_reference` (float64) stands in.
    """
    weights, scales = list(weights), list(scales)
    biases = [None] * len(weights) if biases is None else list(biases)
    _check_linear_int8(input, weights, scales, biases)
    if native_kernel_for(input.device):
        return list(torch.ops.cllm_rt.linear_int8(input, weights, scales, biases))
    return linear_int8_reference(input, weights, scales, biases)


def linear_int8_unchecked(input: torch.Tensor, weights, scales, biases) -> list[torch.Tensor]:
    """:func:`linear_int8` without its Python checks where the native kernel runs (its C++ checks stay): what
    an int8 model's linears call, ~3 us a call less (as :func:`routed_linear`), with the tuning :func:`linear_plan`
    measured for the input's dtype on a CPU (int8 tiles prefetch at every row count, a one-token step's too)."""
    if native_kernel_for(input.device):
        if input.device.type == "cpu" and input.dtype in (torch.float32, torch.float64):  # else C++ refuses it
            _plan_in_force(input.dtype)
        return list(torch.ops.cllm_rt.linear_int8(input, list(weights), list(scales), list(biases)))
    return linear_int8(input, weights, scales, biases)


def greedy_verify(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens [B, n] of the LM head (weight [V, d], bias [V] or None) over hidden [B, n, d], and
    the accepted lengths [B] of block [B, n], as jacobi_verify(F.linear(hidden, weight, bias), block).

    Picks the implementation for the device and size, so that a decoding loop need not know devices:
    :func:`linear` where :func:`linear_pays` (it beats the fused head too: SmolLM2's head on an Intel Xeon
    family 6 model 106, 1 thread, 16.0 vs 24.2 ms at 8 rows), else the fused lm_head_argmax (no [B, n, V]
    logits) on CPU from FUSED_HEAD_MIN_ROWS rows on when there is no bias (bf16 only where the CPU has no AMX:
    :func:`cpu_has_amx_bf16`), else torch's linear layer, then jacobi_verify.
    """
    if isinstance(hidden, torch.Tensor) and linear_pays(hidden):
        return jacobi_verify(linear(hidden, [weight], [bias])[0], block)
    fused = (isinstance(hidden, torch.Tensor) and hidden.device.type == "cpu" and bias is None
             and hidden.shape[:2].numel() >= FUSED_HEAD_MIN_ROWS
             and not (hidden.dtype == torch.bfloat16 and cpu_has_amx_bf16()))
    if fused:
        greedy = lm_head_argmax(hidden, weight)
        _check_index_matrix("block", block, greedy.shape, "hidden", hidden)
        return greedy, accepted_length(block, greedy)
    return jacobi_verify(F.linear(hidden, weight, bias), block)


# ---------------------------------------------------------------- seeded sampling

class Sampling(NamedTuple):
    """Per-row sampling parameters of a batch, as tensors on the logits' device.

    seeds [B] int64; temperature [B] float64 (0: greedy); top_k [B] int64 (0: off); top_p [B] float64
    (1: off); min_p [B] float64 (0: off). The masks apply in this order, as transformers' warpers do,
    each to the distribution the previous ones left.
    """
    seeds: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor


def seed_as_int64(value: int) -> int:
    """A Python integer as the int64 holding its low 64 bits (the kernels read seeds as uint64)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


_MIX1, _MIX2, _GOLDEN = (seed_as_int64(c) for c in (0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9E3779B97F4A7C15))


def _shift_right(z, k):
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix64(z):
    """csrc/gumbel_noise.h's mix64 in int64 torch ops: products wrap as uint64 products do."""
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def gumbel_uniform_reference(seeds, positions, vocab):
    """The uniforms in (0, 1) behind the noise, [B, n, vocab] float64, bit for bit those of the kernels."""
    stream = _mix64(_mix64(seeds)[:, None] + positions * _GOLDEN)  # [B, n]
    counter = (torch.arange(vocab, device=positions.device) + 1) * _GOLDEN
    bits = _shift_right(_mix64(stream[:, :, None] + counter), 11)
    return (bits.double() + 0.5) * 2.0 ** -53


def gumbel_argmax_reference(logits, seeds, positions, temperature):
    noise = -torch.log(-torch.log(gumbel_uniform_reference(seeds, positions, logits.shape[2])))
    t = temperature.view(-1, 1, 1)
    z = logits.double()
    sampled = torch.where(z == float("-inf"), z, z / t.clamp(min=1e-300) + noise).argmax(-1)
    return torch.where(temperature[:, None] == 0, logits.argmax(-1), sampled)


def _check_gumbel_argmax(logits, seeds, positions, temperature):
    _check_tensor("logits", logits, 3, _FLOAT_DTYPES)
    if logits.shape[1] == 0 or not 0 < logits.shape[2] < _INT32_MAX:
        raise ValueError(f"logits must have n >= 1 and 1 <= V < 2**31 - 1, got shape {tuple(logits.shape)}")
    _check_tensor("seeds", seeds, 1, (torch.int64,))
    _check_same_device("seeds", seeds, "logits", logits)
    _check_index_matrix("positions", positions, logits.shape[:2], "logits", logits)
    _check_tensor("temperature", temperature, 1, (torch.float64,))
    _check_same_device("temperature", temperature, "logits", logits)
    for name, x in (("seeds", seeds), ("temperature", temperature)):
        if x.shape[0] != logits.shape[0]:
            raise ValueError(f"{name} must have shape [B={logits.shape[0]}], got {tuple(x.shape)}")


def gumbel_argmax(logits: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
                  temperature: torch.Tensor) -> torch.Tensor:
    """Sampled tokens [B, n] int64: argmax_v(logits[b, i, v] / temperature[b] + g), g standard Gumbel noise
    that is a pure function of (seeds[b], positions[b, i], v) (csrc/gumbel_noise.h), so a token sampled from
    softmax(logits / T) is as reproducible, and as verifiable by any decoding path, as a greedy one.

    seeds [B] int64, positions [B, n] int64 (the absolute position of the token each logits row predicts),
    temperature [B] float64 >= 0: a row with 0 is logits.argmax(-1) exactly. -inf logits are masked out.
    """
    _check_gumbel_argmax(logits, seeds, positions, temperature)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if native_kernel_for(logits.device):
        return torch.ops.cllm_rt.gumbel_argmax(logits, seeds, positions, temperature)
    return gumbel_argmax_reference(logits, seeds, positions, temperature)


def sampling_mask(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """[B, n, V] bool: the tokens top_k, top_p and min_p remove from each row's softmax(logits / T).

    Ties with the last kept value are kept, and the largest logit never goes, so a greedy row (T = 0) keeps
    its argmax whatever its masks say.
    """
    B, n, V = logits.shape
    t = torch.where(sampling.temperature > 0, sampling.temperature, 1.0).view(B, 1, 1)
    scaled = logits.double() / t
    remove = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    k = torch.where((sampling.top_k > 0) & (sampling.top_k < V), sampling.top_k, V)
    cut = bool((k < V).any())
    nucleus = bool((sampling.top_p < 1).any())
    if cut or nucleus:
        # the candidates in descending order: the top max(k) when every row has a top_k, else the whole row
        widest = int(k.max())
        ordered = scaled.topk(widest, -1).values if widest < V else scaled.sort(-1, descending=True).values
        kth = ordered.gather(-1, (k.clamp(max=widest) - 1).view(B, 1, 1).expand(B, n, 1))
        remove |= scaled < kth
        if nucleus:
            # softmax over the survivors of top_k, in the candidates' order: the mass of the strictly likelier
            survivors = ordered.masked_fill(ordered < kth, float("-inf"))
            probs = (survivors - survivors[..., :1]).exp()
            probs = probs / probs.sum(-1, keepdim=True)
            before = probs.cumsum(-1) - probs
            kept = (before < sampling.top_p.view(B, 1, 1)).sum(-1, keepdim=True).clamp(min=1)
            remove |= scaled < ordered.gather(-1, kept - 1)
    if bool((sampling.min_p > 0).any()):
        floor = scaled.amax(-1, keepdim=True)  # the largest logit always survives the masks above
        remove |= scaled < floor + torch.log(sampling.min_p).view(B, 1, 1)
    return remove


def sample_verify(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, block: torch.Tensor,
                  sampling: Sampling | None, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """greedy_verify with sampled tokens: the tokens [B, n] gumbel_argmax draws from the masked LM-head
    logits (positions [B, n]: the absolute position each node predicts), and the accepted lengths [B] of
    ``block`` under the unchanged accept rule. Without sampling, or with every temperature 0, it is
    greedy_verify itself.
    """
    if sampling is None or not bool((sampling.temperature > 0).any()):
        return greedy_verify(hidden, weight, bias, block)
    (logits,) = routed_linear(hidden, [weight], [bias])
    return logits_verify(logits, block, sampling, positions)


def logits_verify(logits: torch.Tensor, block: torch.Tensor, sampling: Sampling | None = None,
                  positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_verify` from logits [B, n, V] already computed (an int8 LM head's): the greedy tokens
    (:func:`jacobi_verify`) or, with sampling, the seeded sampled ones, and the accepted lengths [B] of
    ``block``."""
    if sampling is None or not bool((sampling.temperature > 0).any()):
        return jacobi_verify(logits, block)
    logits = logits.masked_fill(sampling_mask(logits, sampling), float("-inf"))
    tokens = gumbel_argmax(logits, sampling.seeds, positions, sampling.temperature)
    _check_index_matrix("block", block, tokens.shape, "logits", logits)
    return tokens, accepted_length(block, tokens)


if _C is not None:
    @torch.library.register_fake("cllm_rt::jacobi_verify")
    def _(logits, block):
        B, n, _ = logits.shape
        return block.new_empty((B, n)), block.new_empty((B,))

    @torch.library.register_fake("cllm_rt::block_attention")
    def _(q, k_cache, v_cache, cache_lens, scale, page_table=None):
        return q.new_empty(q.shape)

    @torch.library.register_fake("cllm_rt::tree_attention")
    def _(q, k_cache, v_cache, cache_lens, parents, scale, page_table=None):
        return q.new_empty(q.shape)

    @torch.library.register_fake("cllm_rt::tree_verify")
    def _(greedy, tokens, parents):
        B, n = greedy.shape
        return greedy.new_empty((B,)), greedy.new_empty((B,)), greedy.new_empty((B, n))

    @torch.library.register_fake("cllm_rt::lm_head_argmax")
    def _(hidden, weight):
        return hidden.new_empty(hidden.shape[:2], dtype=torch.int64)

    @torch.library.register_fake("cllm_rt::linear")
    def _(input, weights, biases):
        return [input.new_empty((*input.shape[:-1], w.shape[0])) for w in weights]

    @torch.library.register_fake("cllm_rt::linear_int8")
    def _(input, weights, scales, biases):
        return [input.new_empty((*input.shape[:-1], w.shape[0])) for w in weights]

    @torch.library.register_fake("cllm_rt::gumbel_argmax")
    def _(logits, seeds, positions, temperature):
        return positions.new_empty(positions.shape)

    @torch.library.register_fake("cllm_rt::gumbel_uniform")
    def _(seeds, positions, vocab):
        return positions.new_empty((*positions.shape, vocab), dtype=torch.float64)
