"""The extension built, its CUDA sources compile as torch's build compiles them, the
CUDA kernels' shared-memory planning holds, and the fallback path works.

The CUDA compile checks need no GPU: the kernels are framework-free .cu files (plain
nvcc), and the glue (csrc/cuda/*.cpp) needs only the headers of a CUDA build of torch:
the running torch's when it is one, else those at $CLLM_RT_CUDA_TORCH_INCLUDE (e.g.
`unzip torch-*.whl 'torch/include/*'` from a CUDA wheel). They compile PTX only, for
the oldest architecture nvcc 13 targets: the compiler front end and NVVM see every
line, ptxas (register allocation, a third of the time) runs in scripts/gpu_check.sh.
"""
import os
import pathlib
import shutil
import subprocess
import sysconfig

import pytest
import torch
import torch.nn.functional as F
from torch.utils import cpp_extension

from cllm_rt import ops

CSRC = pathlib.Path(__file__).parents[1] / "csrc"
CUDA_SOURCES = sorted((CSRC / "cuda").glob("*.cu"))
CUDA_GLUE = sorted((CSRC / "cuda").glob("*.cpp"))
# What torch's BuildExtension adds to every source besides COMMON_NVCC_FLAGS and the
# include dirs (torch/utils/cpp_extension.py; not exported as constants), plus setup.py's
# CUDA macro.
EXTENSION_FLAGS = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-std=c++20",
                   "-DCLLM_RT_WITH_CUDA"]
PTX_ONLY = ["-gencode=arch=compute_75,code=compute_75"]


def _nvcc():
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(pathlib.Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc")
    candidates.append(pathlib.Path("/usr/local/cuda/bin/nvcc"))
    found = shutil.which("nvcc")
    candidates += [pathlib.Path(found)] if found else []
    return next((str(c) for c in candidates if c.exists()), None)


def _cuda_torch_include():
    """include/ of a CUDA build of torch (it alone has c10/cuda/impl/cuda_cmake_macros.h), or None."""
    for candidate in (cpp_extension.include_paths()[0], os.environ.get("CLLM_RT_CUDA_TORCH_INCLUDE")):
        if candidate and (pathlib.Path(candidate) / "c10/cuda/impl/cuda_cmake_macros.h").exists():
            return pathlib.Path(candidate)
    return None


@pytest.fixture(scope="module")
def cuda_builds(tmp_path_factory):
    """Compiles every CUDA source at once (nvcc for .cu, c++ for the glue) with the flags
    torch's CUDAExtension build uses; {file name: (object path, returncode, stderr)}, or
    {file name: skip reason}."""
    nvcc, torch_include = _nvcc(), _cuda_torch_include()
    out = tmp_path_factory.mktemp("cuda_objects")
    if nvcc is None:
        return {src.name: "nvcc not found" for src in CUDA_SOURCES + CUDA_GLUE}
    cuda_include = pathlib.Path(nvcc).parents[1] / "include"
    includes = [f"-I{d}" for d in cpp_extension.include_paths()] + [f"-I{cuda_include}"]
    commands = {src.name: [nvcc, *cpp_extension.COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC",
                           "-O3", *EXTENSION_FLAGS, *PTX_ONLY, *includes, "-c", str(src)]
                for src in CUDA_SOURCES}
    results = {}
    for src in CUDA_GLUE:
        if torch_include is None:
            results[src.name] = ("no headers of a CUDA build of torch: install one, or point "
                                 "CLLM_RT_CUDA_TORCH_INCLUDE at its include/")
            continue
        # -O0: what is checked is that it compiles, and code generation is the slow part.
        commands[src.name] = [cpp_extension.get_cxx_compiler(), "-fPIC", "-Wall", "-O0",
                              *EXTENSION_FLAGS, f"-I{torch_include}",
                              f"-I{torch_include / 'torch/csrc/api/include'}", f"-I{cuda_include}",
                              f"-I{sysconfig.get_paths()['include']}", "-c", str(src)]
    running = {name: subprocess.Popen(command + ["-o", str(out / f"{name}.o")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for name, command in commands.items()}
    for name, process in running.items():
        _, stderr = process.communicate(timeout=600)
        results[name] = (out / f"{name}.o", process.returncode, stderr)
    return results


def _built(cuda_builds, name):
    result = cuda_builds[name]
    if isinstance(result, str):
        pytest.skip(result)
    obj, returncode, stderr = result
    assert returncode == 0, stderr
    return obj


def test_native_extension_loaded():
    if os.environ.get("CLLM_RT_ALLOW_FALLBACK") == "1":
        pytest.skip("CLLM_RT_ALLOW_FALLBACK=1: the reference ops may stand in")
    assert ops.native_available(), "cllm_rt._C did not load: the extension did not build"


def test_cuda_sources_exist():
    assert CUDA_SOURCES and CUDA_GLUE, "no csrc/cuda/*.cu or *.cpp found"


@pytest.mark.parametrize("source", CUDA_SOURCES + CUDA_GLUE, ids=lambda p: p.name)
def test_cuda_source_compiles(source, cuda_builds):
    _built(cuda_builds, source.name)


def test_cuda_glue_links_to_the_kernels(cuda_builds):
    # A shared library links with undefined symbols and fails only at import on a GPU
    # machine: every cllm_rt::cuda function the glue calls must be defined by a .cu.
    def symbols(obj, which):  # mangled names of cllm_rt::cuda functions
        listing = subprocess.run(["nm", "-P", which, str(obj)], capture_output=True, text=True,
                                 check=True).stdout
        return {line.split()[0] for line in listing.splitlines() if "7cllm_rt4cuda" in line}
    needed = set().union(*(symbols(_built(cuda_builds, src.name), "--undefined-only")
                           for src in CUDA_GLUE))
    defined = set().union(*(symbols(_built(cuda_builds, src.name), "--defined-only")
                            for src in CUDA_SOURCES))
    assert needed and needed <= defined, sorted(needed - defined)


PLAN_PROGRAM = r"""
#include <cstdio>
#include <initializer_list>
#include "cuda/attention_plan.h"
using namespace cllm_rt::cuda;
int main() {
  long D, elem, acc, tree, limit;
  while (std::scanf("%ld %ld %ld %ld %ld", &D, &elem, &acc, &tree, &limit) == 5) {
    const AttentionPlan plan = plan_attention(D, elem, acc, tree, limit);
    std::printf("%d %d %ld", plan.rows_per_warp, plan.kv_shared, (long)plan.smem_bytes);
    for (int rows : {4, 1}) for (bool shared : {false, true}) {
      const AttentionLayout l = attention_layout(D, elem, acc, kAttentionWarps * rows, shared, tree);
      const bool aligned = l.q_offset % 16 == 0 && l.k_offset % 16 == 0 && l.v_offset % 16 == 0 &&
                           l.q_stride * acc % 16 == 0 && l.v_stride * elem % 16 == 0 &&
                           l.k_stride * elem / 16 % 2 == 1 && l.q_stride >= D;
      std::printf(" %ld:%d", (long)l.bytes, aligned);
    }
    std::printf("\n");
  }
}
"""
# D, element bytes, accumulator bytes, tree, limit -> expected (rows per warp, shared K/V
# buffer, bytes). Limits: 227 KB (H100/H200 opt-in), 99 KB (sm_86/89), 64 KB (T4), 48 KB
# (no opt-in). The first line is the case: float32 at D = 256 needs 98,816 B.
PLAN_CASES = [
    ((256, 4, 4, 0, 232448), (4, False, 98816)),
    ((256, 8, 8, 0, 232448), (4, False, 197120)),
    ((256, 2, 4, 0, 101376), (4, False, 66048)),
    ((256, 4, 4, 0, 101376), (4, False, 98816)),
    ((256, 4, 4, 0, 99000), (4, False, 98816)),
    ((256, 4, 4, 1, 99000), (4, True, 66816)),     # the tree's masks push it over
    ((256, 8, 8, 0, 101376), (1, True, 82432)),
    ((256, 2, 4, 0, 65536), (4, True, 49664)),
    ((256, 4, 4, 0, 65536), (1, True, 41472)),
    ((128, 4, 4, 0, 65536), (4, False, 49664)),
    ((256, 8, 8, 0, 65536), (0, True, 82432)),     # nothing fits: the error names 82,432 B
    ((128, 2, 4, 1, 49152), (4, False, 34048)),
    ((59, 2, 4, 0, 49152), (4, False, 16896)),
]


def test_attention_shared_memory_plan(tmp_path):
    # The planner is a host function in a framework-free header, so a host compiler runs
    # it here; on a GPU, CLLM_RT_CUDA_SMEM_LIMIT forces these small-memory plans too.
    source = tmp_path / "plan.cpp"
    source.write_text(PLAN_PROGRAM)
    binary = tmp_path / "plan"
    subprocess.run([cpp_extension.get_cxx_compiler(), "-std=c++17", f"-I{CSRC}", str(source), "-o",
                    str(binary)], check=True, capture_output=True, text=True)
    stdin = "\n".join(" ".join(map(str, case)) for case, _ in PLAN_CASES)
    lines = subprocess.run([str(binary)], input=stdin, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    for (case, expected), line in zip(PLAN_CASES, lines, strict=True):
        rows, shared, smem, *layouts = line.split()
        assert (int(rows), bool(int(shared)), int(smem)) == expected, (case, line)
        sizes = [int(layout.split(":")[0]) for layout in layouts]
        assert all(layout.endswith(":1") for layout in layouts), (case, line)  # alignment
        fitting = [size for size in sizes if size <= case[-1]]
        assert smem == str(fitting[0] if fitting else sizes[-1]), (case, line)


def _sdpa(q, k_cache, v_cache, visible):
    """Attention as torch computes it, K/V heads repeated: an independent formulation."""
    group = q.shape[1] // k_cache.shape[1]
    return F.scaled_dot_product_attention(q, k_cache.repeat_interleave(group, 1),
                                          v_cache.repeat_interleave(group, 1), attn_mask=visible[:, None])


def test_reference_fallback(monkeypatch):
    # Without the extension every op runs its reference; each is held here against a
    # formulation written independently of it (loops, SDPA with an explicit mask).
    monkeypatch.setattr(ops, "_C", None)
    assert not ops.native_available() and not ops.native_kernel_for(torch.device("cpu"))
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 50, dtype=torch.float64)
    block = torch.randint(0, 50, (2, 4))
    block[0, 1:3] = logits[0, :2].argmax(-1)  # row 0 accepts 3, row 1 (almost surely) 1
    greedy, accepted = ops.jacobi_verify(logits, block)
    assert greedy.tolist() == [[max(range(50), key=row.__getitem__) for row in r] for r in logits.tolist()]
    assert accepted.tolist() == [3, 1 + (block[1, 1] == greedy[1, 0]).item()]

    q, k, v = (torch.randn(2, 4, 3, 8, dtype=torch.float64), torch.randn(2, 2, 10, 8, dtype=torch.float64),
               torch.randn(2, 2, 10, 8, dtype=torch.float64))
    lens = torch.tensor([0, 7])
    causal = torch.tensor([[[s <= c + i for s in range(10)] for i in range(3)] for c in lens.tolist()])
    torch.testing.assert_close(ops.block_attention(q, k, v, lens), _sdpa(q, k, v, causal))
    with pytest.raises(ValueError, match="cache_lens"):
        ops.block_attention(q, k, v, torch.tensor([0, 8]))

    parents = torch.tensor([[-1, 0, 0], [-1, -1, 1]])  # row 1: a forest

    def sees(b, i, s):  # cache position s, or the block position of i or an ancestor of i
        c = lens[b].item()
        while i >= 0 and c + i != s:
            i = parents[b, i].item()
        return s < c or i >= 0
    tree = torch.tensor([[[sees(b, i, s) for s in range(10)] for i in range(3)] for b in range(2)])
    torch.testing.assert_close(ops.tree_attention(q, k, v, lens, parents), _sdpa(q, k, v, tree))
    with pytest.raises(ValueError, match="parents"):
        ops.tree_attention(q, k, v, lens, torch.tensor([[-1, 0, 2], [-1, 0, 0]]))

    greedy = torch.tensor([[4, 6, 8], [4, 6, 8]])
    tokens = torch.tensor([[0, 4, 4], [0, 4, 6]])  # row 0: both children confirmed; row 1: node 1 is a root
    accepted, node, path = ops.tree_verify(greedy, tokens, parents)
    assert accepted.tolist() == [2, 1] and node.tolist() == [1, 0]
    assert path.tolist() == [[0, 1, -1], [0, -1, -1]]

    hidden, weight = torch.randn(1, 2, 8, dtype=torch.float64), torch.randn(9, 8, dtype=torch.float64)
    assert ops.lm_head_argmax(hidden, weight).tolist() == [
        [max(range(9), key=lambda j: sum(a * b for a, b in zip(h, weight[j].tolist()))) for h in row]
        for row in hidden.tolist()]


def test_a_missing_extension_is_reported_as_not_built(monkeypatch):
    """Without a compiled _C the warning says "not built" and gives the build command, not Python's
    "cannot import name '_C' from partially initialized module"."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cllm_rt._C" else real(name, *a))
    with pytest.warns(RuntimeWarning, match=r"not built.*pip install --no-build-isolation -e \."):
        assert ops._load_extension() is None
