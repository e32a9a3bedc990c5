// gumbel_argmax on CUDA: sampled tokens argmax(logits / T + Gumbel noise) per row.
//
// One thread block per (b, i) logits row; every thread draws the noise of the tokens
// it visits (gumbel_noise.h, shared with the CPU kernel), so no [n, V] noise exists.
// Values are compared in float64: for temperature 0 that is the plain argmax (every
// float widens exactly), the greedy token bit for bit.
#include "../gumbel_noise.h"
#include "common.cuh"

namespace cllm_rt::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gumbel_argmax_kernel(const T* logits, int64_t n, int64_t V, int64_t sb, int64_t si,
                         const int64_t* seeds, const int64_t* positions,
                         const double* temperature, int64_t* tokens) {
  const int64_t row = blockIdx.x, b = row / n;
  const T* x = logits + b * sb + (row % n) * si;
  const double t = temperature[b];
  const uint64_t stream =
      gumbel_stream(static_cast<uint64_t>(seeds[b]), static_cast<uint64_t>(positions[row]));
  RunningArgMax<double> mine;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) {
    const double z = static_cast<double>(to_acc(x[v]));
    const bool plain = t == 0.0 || z == -static_cast<double>(INFINITY);  // greedy, or masked out
    mine.push(plain ? z : z / t + gumbel_noise(stream, static_cast<uint64_t>(v)), v);
  }
  const ArgMax<double> best = block_reduce_argmax<double, kThreads>(mine.result());
  if (threadIdx.x == 0) tokens[row] = best.index;
}

}  // namespace

cudaError_t gumbel_argmax(const void* logits, DType dtype, int64_t B, int64_t n, int64_t V,
                          int64_t sb, int64_t si, const int64_t* seeds, const int64_t* positions,
                          const double* temperature, int64_t* tokens, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    gumbel_argmax_kernel<T><<<B * n, kThreads, 0, stream>>>(
        static_cast<const T*>(logits), n, V, sb, si, seeds, positions, temperature, tokens);
    return cudaGetLastError();
  });
}

}  // namespace cllm_rt::cuda
