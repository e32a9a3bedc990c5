// Shared-memory planning of the CUDA attention kernel (attention.cu), apart from any
// CUDA or torch header so that a host compiler can test it (tests/test_build.py).
//
// One thread block of the kernel holds, in shared memory: the tree's ancestor masks
// (tree_attention only), its query rows scaled and widened to the accumulation type,
// and a tile of kKeyTile keys and one of values in the input type. The rows per block
// are sized against the device's opt-in limit per block: Hopper allows 227 KB, sm_80
// 163 KB, sm_86/89 99 KB, sm_75 64 KB, and 48 KB without opting in.
#pragma once

#include <cstdint>
#include <initializer_list>

#include "../common.h"

namespace cllm_rt::cuda {

constexpr int kAttentionWarps = 8;
constexpr int kAttentionThreads = kAttentionWarps * 32;
constexpr int kKeyTile = 32;  // one key per lane
constexpr int64_t kDefaultSharedMemory = 48 * 1024;  // usable without cudaFuncSetAttribute

CLLM_RT_HOST_DEVICE int64_t round_up_to(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Byte offsets and element strides of one block's shared memory:
// [ancestors u64 x kMaxTreeNodes | parents i32 x kMaxTreeNodes] (tree only),
// Q [rows x q_stride] acc_t, K [kKeyTile x k_stride] T, V [kKeyTile x v_stride] T,
// V aliasing K's buffer when kv_shared (loaded after the scores are taken).
struct AttentionLayout {
  int64_t q_stride, k_stride, v_stride;  // in elements
  int64_t q_offset, k_offset, v_offset, bytes;
};

CLLM_RT_HOST_DEVICE AttentionLayout attention_layout(int64_t D, int64_t elem_bytes, int64_t acc_bytes,
                                                     int64_t rows, bool kv_shared, bool tree) {
  const int64_t pack = 16 / elem_bytes;  // elements of T per 16-byte load
  AttentionLayout l{};
  // Rows padded to whole 16-byte packs of T (Q's padding is zeros, so the dot product
  // can run over whole packs); Q in acc_t, a multiple of 16 bytes too.
  l.q_stride = round_up_to(D, pack);
  // K rows are an odd number of packs: the 8 lanes of a quarter-warp, each reading 16
  // bytes of its own key row, then hit 8 different 16-byte bank groups.
  const int64_t k_packs = l.q_stride / pack;
  l.k_stride = (k_packs % 2 == 1 ? k_packs : k_packs + 1) * pack;
  l.v_stride = l.q_stride;
  l.q_offset = tree ? kMaxTreeNodes * (8 + 4) : 0;
  l.k_offset = l.q_offset + rows * l.q_stride * acc_bytes;
  const int64_t k_bytes = kKeyTile * l.k_stride * elem_bytes;
  l.v_offset = kv_shared ? l.k_offset : l.k_offset + k_bytes;
  l.bytes = l.k_offset + (kv_shared ? k_bytes : k_bytes + kKeyTile * l.v_stride * elem_bytes);
  return l;
}

// rows_per_warp == 0: no configuration fits; smem_bytes is then the smallest need.
struct AttentionPlan {
  int rows_per_warp;
  bool kv_shared;
  int64_t smem_bytes;
};

// The first configuration within smem_limit bytes, in order of preference: more query
// rows per block first (every K/V tile read serves them all), then separate K and V
// buffers before one shared buffer (which costs two more barriers per tile).
inline AttentionPlan plan_attention(int64_t D, int64_t elem_bytes, int64_t acc_bytes, bool tree,
                                    int64_t smem_limit) {
  AttentionPlan smallest{0, true, 0};
  for (const int rows_per_warp : {4, 1}) {
    for (const bool kv_shared : {false, true}) {
      const int64_t bytes =
          attention_layout(D, elem_bytes, acc_bytes, kAttentionWarps * rows_per_warp, kv_shared, tree).bytes;
      if (bytes <= smem_limit) return {rows_per_warp, kv_shared, bytes};
      smallest.smem_bytes = bytes;
    }
  }
  return smallest;
}

}  // namespace cllm_rt::cuda
