// lm_head_argmax on CUDA: greedy tokens argmax(hidden @ weight.T) without the logits.
//
// A simple tiled version. Pass 1: thread block (vocabulary tile, row tile) computes
// the logits of kVocabPerBlock weight rows against kRowsPerBlock hidden rows: each
// warp takes every kWarps-th weight row of the tile, its lanes stride the feature
// dim with 16-byte loads, and a warp sum gives the logit; lane j keeps row j's
// running argmax. The warps' results merge into one partial per (tile, row).
// Pass 2: one thread block per row merges the tiles' partials.
#include <algorithm>

#include "common.cuh"

namespace cllm_rt::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerBlock = 8;
constexpr int kVocabPerBlock = 64;
constexpr int kReduceThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    logits_tile_argmax_kernel(const T* __restrict__ hidden, const T* __restrict__ weight,
                              int64_t R, int64_t d, int64_t V, bool vectorized,
                              int64_t first_row, ArgMax<Acc<T>>* partial) {
  using acc_t = Acc<T>;
  __shared__ ArgMax<acc_t> warp_best[kWarps][kRowsPerBlock];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t r0 = first_row + blockIdx.y * int64_t(kRowsPerBlock);
  const int64_t v0 = blockIdx.x * int64_t(kVocabPerBlock);
  const int64_t rows = min(int64_t(kRowsPerBlock), R - r0);

  RunningArgMax<acc_t> mine;  // lane j < rows: row r0 + j over this warp's weight rows
  for (int64_t v = v0 + warp; v < min(V, v0 + kVocabPerBlock); v += kWarps) {
    const T* w = weight + v * d;
    acc_t dot[kRowsPerBlock] = {};
    lane_dots(w, hidden + r0 * d, d, rows, vectorized, lane, dot);
#pragma unroll
    for (int j = 0; j < kRowsPerBlock; ++j) {
      const acc_t logit = warp_sum(dot[j]);
      if (lane == j) mine.push(logit, v);
    }
  }
  if (lane < kRowsPerBlock) warp_best[warp][lane] = mine.result();
  __syncthreads();
  if (threadIdx.x < rows) {
    ArgMax<acc_t> best = warp_best[0][threadIdx.x];
    for (int w = 1; w < kWarps; ++w) best = merge_argmax(best, warp_best[w][threadIdx.x]);
    partial[blockIdx.x * R + r0 + threadIdx.x] = best;
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads)
    merge_tiles_kernel(const ArgMax<acc_t>* partial, int64_t R, int64_t tiles, int64_t* out) {
  const int64_t r = blockIdx.x;
  ArgMax<acc_t> best{acc_t(0), -1, false};
  for (int64_t t = threadIdx.x; t < tiles; t += kReduceThreads) {
    best = merge_argmax(best, partial[t * R + r]);
  }
  best = block_reduce_argmax<acc_t, kReduceThreads>(best);
  if (threadIdx.x == 0) out[r] = best.index;
}

}  // namespace

size_t lm_head_argmax_workspace_bytes(int64_t R, int64_t V) {
  return ceil_div(V, kVocabPerBlock) * R * sizeof(ArgMax<double>);  // fits ArgMax<float> too
}

cudaError_t lm_head_argmax(const void* hidden, const void* weight, DType dtype, int64_t R,
                           int64_t d, int64_t V, void* workspace, int64_t* out,
                           cudaStream_t stream) {
  if (R == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc_t = Acc<T>;
    const T* h = static_cast<const T*>(hidden);
    const T* w = static_cast<const T*>(weight);
    const bool vectorized = d * sizeof(T) % 16 == 0 && aligned16(h) && aligned16(w);
    auto* partial = static_cast<ArgMax<acc_t>*>(workspace);
    const int64_t tiles = ceil_div(V, kVocabPerBlock);
    // grid.y holds at most 65535 row tiles: launch as many grids as R needs.
    constexpr int64_t kRowsPerGrid = 65535 * int64_t(kRowsPerBlock);
    for (int64_t first_row = 0; first_row < R; first_row += kRowsPerGrid) {
      const int64_t row_tiles = ceil_div(std::min(kRowsPerGrid, R - first_row), kRowsPerBlock);
      logits_tile_argmax_kernel<T><<<dim3(tiles, row_tiles), kThreads, 0, stream>>>(
          h, w, R, d, V, vectorized, first_row, partial);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    merge_tiles_kernel<acc_t><<<R, kReduceThreads, 0, stream>>>(partial, R, tiles, out);
    return cudaGetLastError();
  });
}

}  // namespace cllm_rt::cuda
