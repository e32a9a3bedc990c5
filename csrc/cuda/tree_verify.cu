// tree_verify on CUDA: the deepest node of a token tree that greedy decoding confirms
// (the rules: csrc/cpu/tree_verify.cpp and cllm_rt/ops.py).
//
// One warp per row. Lane l settles nodes l, l + 32 (n <= kMaxTreeNodes): it walks from
// the node up to the root checking every edge (tokens[c] == greedy[parent]), so all
// nodes are settled in parallel in at most depth steps with no shared state; a warp
// reduction then picks the deepest confirmed node, the smallest index among ties, and
// lane 0 writes its path.
#include "common.cuh"

namespace cllm_rt::cuda {
namespace {

constexpr int kWarpsPerBlock = 4;

__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    tree_verify_kernel(const int64_t* greedy, const int64_t* tokens, const int64_t* parents,
                       int64_t B, int64_t n, int64_t* accepted, int64_t* node, int64_t* path) {
  const int64_t b = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= B) return;  // the whole warp together
  const int64_t *g = greedy + b * n, *t = tokens + b * n, *p = parents + b * n;
  int64_t best_depth = -1, best = n;
  for (int64_t i = lane; i < n; i += 32) {
    int64_t depth = 0, c = i;
    // Checked parents precede their nodes; a walk stops at any that does not.
    while (c != 0) {
      const int64_t parent = p[c];
      if (parent < 0 || parent >= c || t[c] != g[parent]) break;
      c = parent;
      ++depth;
    }
    if (c == 0 && depth > best_depth) {  // i ascends: strict '>' keeps the smaller index
      best_depth = depth;
      best = i;
    }
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    const int64_t other_depth = __shfl_xor_sync(0xffffffffu, best_depth, offset);
    const int64_t other = __shfl_xor_sync(0xffffffffu, best, offset);
    if (other_depth > best_depth || (other_depth == best_depth && other < best)) {
      best_depth = other_depth;
      best = other;
    }
  }
  for (int64_t k = lane; k < n; k += 32) path[b * n + k] = -1;
  __syncwarp();  // orders the fill before lane 0's path writes
  if (lane == 0) {
    accepted[b] = best_depth + 1;
    node[b] = best;
    for (int64_t depth = best_depth, c = best; depth >= 0; --depth, c = p[c]) path[b * n + depth] = c;
  }
}

}  // namespace

cudaError_t tree_verify(const int64_t* greedy, const int64_t* tokens, const int64_t* parents,
                        int64_t B, int64_t n, int64_t* accepted, int64_t* node, int64_t* path,
                        cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (n < 1 || n > kMaxTreeNodes) return cudaErrorInvalidValue;
  tree_verify_kernel<<<ceil_div(B, kWarpsPerBlock), kWarpsPerBlock * 32, 0, stream>>>(
      greedy, tokens, parents, B, n, accepted, node, path);
  return cudaGetLastError();
}

}  // namespace cllm_rt::cuda
