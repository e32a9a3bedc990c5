// linear on CUDA: out = input @ weight.T (+ bias) for a few rows (a token tree x batch), each
// weight row read from memory once for all rows; linear_int8, the same with int8 weights and a
// scale per weight row.
//
// A decode step's linears are skinny products (R = 1..64 rows against N x K weights) that
// only read the weights: each warp takes one weight row, its lanes stride the feature dim
// (16-byte loads where aligned), and kRowsPerPass input rows (L1/L2-resident) meet each
// weight element per pass; a warp sum gives the outputs. Row invariance as on the CPU: an
// output's sum runs over the same lanes in the same order and the same butterfly whatever
// R is, so a row's bits do not depend on the other rows of the call.
#include "common.cuh"

namespace cllm_rt::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerPass = 8;

// out = (input @ weight.T) (* scale) (+ bias) for weight rows of T, or int8 with a scale per row
// (scale: nullptr for T weights; each sum is scaled once, before the bias).
template <typename T, typename W>
__global__ void __launch_bounds__(kThreads)
    linear_kernel(const T* __restrict__ x, const W* __restrict__ weight, const T* __restrict__ scale,
                  const T* __restrict__ bias, int64_t R, int64_t K, int64_t N, bool vectorized,
                  T* __restrict__ out) {
  using acc_t = Acc<T>;
  const int lane = threadIdx.x % 32;
  const int64_t n = blockIdx.x * int64_t(kWarps) + threadIdx.x / 32;
  if (n >= N) return;  // whole warps leave: warp_sum below needs all 32 lanes
  const W* w = weight + n * K;
  for (int64_t r0 = 0; r0 < R; r0 += kRowsPerPass) {
    const int64_t rows = min(int64_t(kRowsPerPass), R - r0);
    acc_t dot[kRowsPerPass] = {};
    lane_dots(w, x + r0 * K, K, rows, vectorized, lane, dot);
    const acc_t b = bias ? to_acc(bias[n]) : acc_t(0);
#pragma unroll
    for (int j = 0; j < kRowsPerPass; ++j) {
      acc_t sum = warp_sum(dot[j]);
      if (scale) sum *= to_acc(scale[n]);
      if (lane == 0 && j < rows) out[(r0 + j) * N + n] = from_acc<T>(bias ? sum + b : sum);
    }
  }
}

}  // namespace

cudaError_t linear(const void* input, const void* weight, const void* bias, DType dtype, int64_t R,
                   int64_t K, int64_t N, void* out, cudaStream_t stream) {
  if (R == 0 || N == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(input);
    const T* w = static_cast<const T*>(weight);
    const bool vectorized = K * sizeof(T) % 16 == 0 && aligned16(x) && aligned16(w);
    linear_kernel<T, T><<<ceil_div(N, kWarps), kThreads, 0, stream>>>(
        x, w, nullptr, static_cast<const T*>(bias), R, K, N, vectorized, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

cudaError_t linear_int8(const void* input, const int8_t* weight, const void* scale, const void* bias,
                        DType dtype, int64_t R, int64_t K, int64_t N, void* out, cudaStream_t stream) {
  if (R == 0 || N == 0) return cudaSuccess;
  const auto launch = [&](auto tag) {
    using T = decltype(tag);
    linear_kernel<T, int8_t><<<ceil_div(N, kWarps), kThreads, 0, stream>>>(
        static_cast<const T*>(input), weight, static_cast<const T*>(scale), static_cast<const T*>(bias), R,
        K, N, /*vectorized=*/false, static_cast<T*>(out));
    return cudaGetLastError();
  };
  if (dtype == DType::kFloat32) return launch(float{});
  if (dtype == DType::kFloat64) return launch(double{});
  return cudaErrorInvalidValue;
}

}  // namespace cllm_rt::cuda
