// Device helpers shared by the CUDA kernels: element types, 16-byte packs, dtype
// dispatch, and warp/block reductions of argmax with torch.argmax's tie and NaN rules
// (the rules themselves live in ../common.h, shared with the CPU kernels).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "../common.h"  // ArgMax, merge_argmax, RunningArgMax: the CPU kernels' rules too
#include "kernels.h"

namespace cllm_rt::cuda {

// Accumulation type: float32 for every input but float64.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using Acc = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(Acc<T> x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// 16 bytes of T: one vectorized load.
template <typename T>
struct alignas(16) Pack16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ Pack16<T> load16(const T* p) {
  return *reinterpret_cast<const Pack16<T>*>(p);
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// This lane's share of kRows dot products of one weight row w[0..K) with the input rows
// x[j*K ..] for j < rows: dot[j] += w[k] * x[j][k] over the k this lane strides (the 32
// lanes of a warp split K; 16-byte loads where `vectorized`). A warp_sum finishes each.
// The order of the sum depends on neither kRows nor rows. Weights are of x's type W = T, or
// int8 (W = int8_t: converted exactly, one element per lane: their rows are a quarter of
// float32's bytes, so 16-byte loads would leave most lanes idle at K of a few hundred).
template <int kRows, typename T, typename W>
__device__ __forceinline__ void lane_dots(const W* __restrict__ w, const T* __restrict__ x, int64_t K,
                                          int64_t rows, bool vectorized, int lane,
                                          Acc<T> (&dot)[kRows]) {
  if constexpr (std::is_same_v<W, T>) {
    constexpr int kPack = Pack16<T>::kSize;
    if (vectorized) {
      for (int64_t k = lane * kPack; k < K; k += 32 * kPack) {
        const Pack16<T> wp = load16(w + k);
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
          if (j < rows) {
            const Pack16<T> xp = load16(x + j * K + k);
#pragma unroll
            for (int e = 0; e < kPack; ++e) dot[j] += to_acc(wp.v[e]) * to_acc(xp.v[e]);
          }
        }
      }
      return;
    }
  }
  for (int64_t k = lane; k < K; k += 32) {
    Acc<T> wk;
    if constexpr (std::is_same_v<W, T>) {
      wk = to_acc(w[k]);
    } else {
      wk = static_cast<Acc<T>>(w[k]);  // exact: every int8 is a float
    }
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      if (j < rows) dot[j] += wk * to_acc(x[j * K + k]);
    }
  }
}

// Calls f(T{}) with T the device element type of dtype.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

template <typename acc_t>
__device__ __forceinline__ ArgMax<acc_t> warp_reduce_argmax(ArgMax<acc_t> x) {
  for (int offset = 16; offset > 0; offset /= 2) {
    ArgMax<acc_t> other;
    other.value = __shfl_xor_sync(0xffffffffu, x.value, offset);
    other.index = __shfl_xor_sync(0xffffffffu, x.index, offset);
    other.nan = __shfl_xor_sync(0xffffffffu, x.nan, offset);
    x = merge_argmax(x, other);
  }
  return x;
}

// Block-wide argmax; every thread must call it; the result is valid in thread 0.
template <typename acc_t, int kThreads>
__device__ __forceinline__ ArgMax<acc_t> block_reduce_argmax(ArgMax<acc_t> x) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps");
  __shared__ ArgMax<acc_t> partial[kThreads / 32];
  x = warp_reduce_argmax(x);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < kThreads / 32 ? partial[lane] : ArgMax<acc_t>{acc_t(0), -1, false};
    x = warp_reduce_argmax(x);
  }
  return x;
}

}  // namespace cllm_rt::cuda
