// Definitions the CPU and the CUDA kernels share: limits of the ops and torch.argmax's
// rules. Framework-free (no torch, no CUDA headers) so that the CPU sources, the plain-
// nvcc .cu files and the Python side (through cllm_rt._C) all read one definition.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define CLLM_RT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CLLM_RT_HOST_DEVICE inline
#endif

namespace cllm_rt {

// Largest head dim of the attention kernels: the CUDA kernel keeps kMaxHeadDim / 32
// output columns per lane in registers, templated on that count.
constexpr int64_t kMaxHeadDim = 256;

// Most nodes of a token tree (tree_attention, tree_verify): a node's ancestors are one
// 64-bit mask, so visibility is a bit test in every kernel.
constexpr int64_t kMaxTreeNodes = 64;

// A paged KV cache's page size must be a multiple of this: the CUDA kernel loads keys
// in tiles of 32 aligned positions, and a tile must never straddle two pages.
constexpr int64_t kPageSizeMultiple = 32;

// Where row b's cache position s lies in the attention ops' k/v caches. Dense caches
// [B, Hkv, S_max, D] are the case of one page of S_max positions per row (page b);
// paged caches [num_pages, Hkv, page_size, D] hold position s of row b in page
// table[b * pages_per_row + s / page_size]. Pages are clamped into the cache, so a
// kernel stays memory-safe on any table (the values are checked before any launch).
struct KvPages {
  const int64_t* table;  // nullptr: dense
  int64_t pages_per_row, page_size, num_pages;

  CLLM_RT_HOST_DEVICE int64_t page(int64_t b, int64_t s) const {
    if (table == nullptr) return b;
    const int64_t p = table[b * pages_per_row + s / page_size];
    return p < 0 ? 0 : (p >= num_pages ? num_pages - 1 : p);
  }
  // Element offset of (row b, KV head h of Hkv, position s) for head dim D.
  CLLM_RT_HOST_DEVICE int64_t offset(int64_t b, int64_t h, int64_t s, int64_t Hkv, int64_t D) const {
    return ((page(b, s) * Hkv + h) * page_size + s % page_size) * D;
  }
  // Positions from s on that lie contiguously in s's page.
  CLLM_RT_HOST_DEVICE int64_t run(int64_t s) const { return page_size - s % page_size; }
};

// A partial argmax; index < 0 means "nothing seen yet".
template <typename acc_t>
struct ArgMax {
  acc_t value;
  int64_t index;
  bool nan;
};

// The better of two partial results as torch.argmax picks it: the first NaN, else the
// larger value, else the smaller index (-0.0 == 0.0 ties). Order-independent, so any
// reduction tree or any merge order of threads gives torch's answer.
template <typename acc_t>
CLLM_RT_HOST_DEVICE ArgMax<acc_t> merge_argmax(const ArgMax<acc_t>& a, const ArgMax<acc_t>& b) {
  if (a.index < 0 || b.index < 0) return a.index < 0 ? b : a;
  if (a.nan != b.nan) return a.nan ? a : b;
  if (!a.nan && a.value != b.value) return a.value > b.value ? a : b;
  return a.index < b.index ? a : b;
}

// Running argmax of one scalar stream visited in increasing index order: strict '>'
// keeps the first maximum, and the first NaN is remembered apart (it wins over all).
template <typename acc_t>
struct RunningArgMax {
  acc_t value = acc_t(0);
  int64_t index = -1;
  int64_t nan_index = -1;

  CLLM_RT_HOST_DEVICE void push(acc_t v, int64_t i) {
    if (v > value || index < 0) {
      value = v;
      index = i;
    }
    if (v != v && nan_index < 0) nan_index = i;
  }
  CLLM_RT_HOST_DEVICE ArgMax<acc_t> result() const {
    if (nan_index >= 0) return {value, nan_index, true};
    return {value, index, false};
  }
};

}  // namespace cllm_rt
