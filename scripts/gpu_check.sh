#!/usr/bin/env bash
# Build cllm_rt with its CUDA kernels for Hopper (sm_90), run the CUDA test cases (also
# under a T4-sized shared-memory limit), the build checks against this torch's headers,
# benchmark the ops, run compute-sanitizer, and finish with a short table. Meant for a lent H100/H200
# machine whose image already has nvcc and a CUDA build of torch (python3):
#
#     bash scripts/gpu_check.sh            # from the repository root
#
# Every step has its own time limit, and no step runs past DEADLINE seconds from the
# start (default 540: inside one 10-minute device call; a device session has 15). Logs and the benchmark JSON go to $OUT (or /tmp/cllm_rt_gpu_check).
# If `import cllm_rt` fails there because the image's transformers is older than
# the package needs, carry wheels in .whl/ (see the device notes): this script
# installs them into /tmp/site first.
set -uo pipefail

OUT=${OUT:-/tmp/cllm_rt_gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}   # /usr/local/bin/nvcc may be a wrapper
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CLLM_RT_CUDA=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # the package is built in place, not installed
DEADLINE=${DEADLINE:-540}
status=0

step() {  # step NAME SECONDS CMD...: run with a limit, log to $OUT/NAME.log, remember failure
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  [ "$limit" -le "$left" ] || limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "== $name: skipped, past the deadline" | tee "$OUT/$name.log"
    status=1
    return 1
  fi
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start))s"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
nvcc_bin="$CUDA_HOME/bin/nvcc"; [ -x "$nvcc_bin" ] || nvcc_bin=nvcc
"$nvcc_bin" --version | tail -1 | tee -a "$OUT/gpu.txt"

# In place, not pip: no dependency resolution on a machine without a package index.
step build 180 $PY setup.py build_ext --inplace || { echo "build failed"; exit 1; }
step import 30 $PY -c "import torch, cllm_rt.ops as o; from cllm_rt import _C; \
assert o.native_available() and _C.WITH_CUDA, 'CUDA kernels not built'; print('native CUDA ops loaded')"

step tests 120 $PY -m pytest -q -x -k cuda tests/test_ops.py
# The attention plans of GPUs with 64 KB of shared memory per block (T4): float64 at
# D = 256 needs more and is refused there, so it is left out.
CLLM_RT_CUDA_SMEM_LIMIT=65536 step tests_64k_smem 90 $PY -m pytest -q -x \
    -k "cuda and attention and not float64" tests/test_ops.py
# The .cu and glue compile checks against this CUDA torch's own headers, the planner.
step build_checks 120 $PY -m pytest -q -x tests/test_build.py

# Out-of-bounds checks of each kernel on small inputs (skipped without the tool):
# one split and several, causal and tree masks, separate and shared K/V buffers.
if command -v compute-sanitizer > /dev/null; then
  step sanitize 120 compute-sanitizer --tool memcheck --error-exitcode 1 $PY -c "
import os, torch, cllm_rt.ops as o
d = 'cuda'
parents = torch.tensor([[-1, 0, 1, 1, 0, -1, 5, 2]] * 2, device=d)
for limit in ('', '40000'):   # the device's plan, then 8 rows and one K/V buffer per block
    os.environ['CLLM_RT_CUDA_SMEM_LIMIT'] = limit or str(1 << 30)
    for dt in (torch.float32, torch.bfloat16, torch.float64):
        x = torch.randn(2, 3, 1001, device=d).to(dt)
        o.jacobi_verify(x[:, :, 1:], torch.zeros(2, 3, dtype=torch.long, device=d))
        q = torch.randn(2, 3, 8, 59, device=d).to(dt).transpose(1, 2)
        k = torch.randn(2, 2, 80, 59, device=d).to(dt)
        o.block_attention(q, k, k.clone(), torch.tensor([0, 72], device=d))
        o.tree_attention(q, k, k.clone(), torch.tensor([3, 72], device=d), parents)
        q = torch.randn(1, 4, 1, 64, device=d).to(dt)
        k = torch.randn(1, 4, 5000, 64, device=d).to(dt)
        o.block_attention(q, k, k.clone(), torch.tensor([4999], device=d))   # many splits
        o.lm_head_argmax(torch.randn(2, 3, 59, device=d).to(dt), torch.randn(999, 59, device=d).to(dt))
        o.linear(torch.randn(11, 59, device=d).to(dt), [torch.randn(37, 59, device=d).to(dt)] * 2,
                 [torch.randn(37, device=d).to(dt), None])
    o.tree_verify(torch.zeros(2, 8, dtype=torch.long, device=d), torch.zeros(2, 8, dtype=torch.long, device=d), parents)
torch.cuda.synchronize()
print('sanitizer run finished')"
fi

# Last: the longest step, and the only one a deadline may cut without losing a check.
step bench 150 $PY benchmarks/bench_ops.py --device cuda --json "$OUT/bench_cuda.json"

echo
echo "== summary"
for log in tests tests_64k_smem build_checks; do
  echo "$log: $(grep -E "passed|failed|error|skipped" "$OUT/$log.log" | tail -1)"
done
grep -E "^(op|jacobi|block|tree|lm_head|linear|device)" "$OUT/bench.log"
exit $status
