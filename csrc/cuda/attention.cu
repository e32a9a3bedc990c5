// block_attention and tree_attention on CUDA: split-KV ("flash-decoding", Dao et al.
// 2023) attention of a block of n queries against a ragged KV cache, GQA. The two ops
// differ only in which of the block's own keys a query sees (causal, or a node's
// ancestors and itself from a 64-bit mask), so one kernel serves both.
//
// Pass 1: thread block (b * Hkv + kv_head, row block, split) takes up to kAttentionWarps *
// rows_per_warp of the G * n query rows that share the KV head, so each K/V tile is
// fetched once for all of them, and one chunk of key positions, cut short at the last
// key any of its rows sees (causality: a prefill's early rows skip the late keys).
// K/V tiles of kKeyTile positions are staged in shared memory in their input type
// with 16-byte loads (attention_plan.h sizes the rows per block to the device). Each
// warp owns rows_per_warp query rows: lane t scores key t of the tile, the online
// softmax (Milakov & Gimelshein 2018) runs on warp shuffles, and the lanes then
// accumulate P * V over head-dim columns lane, lane + 32, ... With one split the block
// writes normalized rows straight to the output; else it writes its unnormalized
// rows and (max, sum), and pass 2 (one thread block per query row) merges the splits.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "common.cuh"

namespace cllm_rt::cuda {
namespace {

constexpr int kCombineThreads = 128;
constexpr int64_t kMaxGridYZ = 65535;
static_assert(kMaxHeadDim <= 32 * 8, "at most 8 head-dim columns per lane");
static_assert(kPageSizeMultiple % kKeyTile == 0, "a key tile must never straddle two pages");

__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t x) {
  for (int offset = 16; offset > 0; offset /= 2) {
    x = max(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}

template <typename T>
struct AttentionParams {
  const T* q;
  const T* k_cache;
  const T* v_cache;
  const void* cache_lens;
  bool lens_is_int64;
  const int64_t* parents;  // nullptr: causal
  KvPages pages;           // where row b's positions lie in the caches (dense or paged)
  AttentionShape s;
  Acc<T> scale;
  int64_t chunk;
  bool kv_shared;
  Acc<T>* o_part;  // split partials (more than one split), else unused
  Acc<T>* m_part;
  Acc<T>* l_part;
  T* out;
};

// dst[r][c] = src[r * D + c] for r < rows and c < D, zero elsewhere up to kKeyTile rows
// and dst_stride columns: padding rows meet p = 0 and padding columns a zero query
// element, and zeros keep those products finite whatever the cache holds.
template <typename T>
__device__ __forceinline__ void load_tile(const T* src, int64_t rows, int64_t D, bool vectorized,
                                          T* dst, int64_t dst_stride) {
  if (vectorized) {  // D * sizeof(T) % 16 == 0: a pack never straddles two rows
    constexpr int kPack = Pack16<T>::kSize;
    for (int64_t p = threadIdx.x; p < rows * D / kPack; p += kAttentionThreads) {
      const int64_t r = p * kPack / D, c = p * kPack % D;
      *reinterpret_cast<Pack16<T>*>(dst + r * dst_stride + c) = load16(src + p * kPack);
    }
  } else {
    for (int64_t e = threadIdx.x; e < rows * D; e += kAttentionThreads) {
      dst[(e / D) * dst_stride + e % D] = src[e];
    }
  }
  const T zero = from_acc<T>(0);
  const int64_t pad = dst_stride - D;
  for (int64_t e = threadIdx.x; e < rows * pad; e += kAttentionThreads) {
    dst[(e / pad) * dst_stride + D + e % pad] = zero;
  }
  for (int64_t e = threadIdx.x; e < (kKeyTile - rows) * dst_stride; e += kAttentionThreads) {
    dst[rows * dst_stride + e] = zero;
  }
}

template <typename T, int kDChunks, int kRowsPerWarp>
__global__ void __launch_bounds__(kAttentionThreads) attention_kernel(AttentionParams<T> p) {
  using acc_t = Acc<T>;
  constexpr int kRows = kAttentionWarps * kRowsPerWarp;
  constexpr int kTPack = Pack16<T>::kSize;
  constexpr int kQPacks = kTPack * sizeof(acc_t) / 16;  // Q packs per K pack
  const acc_t neg_inf = -INFINITY;
  const AttentionShape& s = p.s;
  const bool tree = p.parents != nullptr;
  extern __shared__ __align__(16) unsigned char smem[];
  const AttentionLayout layout =
      attention_layout(s.D, sizeof(T), sizeof(acc_t), kRows, p.kv_shared, tree);
  uint64_t* ancestors_s = reinterpret_cast<uint64_t*>(smem);
  int32_t* parents_s = reinterpret_cast<int32_t*>(ancestors_s + kMaxTreeNodes);
  acc_t* q_s = reinterpret_cast<acc_t*>(smem + layout.q_offset);
  T* k_s = reinterpret_cast<T*>(smem + layout.k_offset);
  T* v_s = reinterpret_cast<T*>(smem + layout.v_offset);

  const int64_t z = blockIdx.x, split = blockIdx.z, num_splits = gridDim.z;
  const int64_t b = z / s.Hkv, kvh = z % s.Hkv, G = s.Hq / s.Hkv, M = G * s.n, D = s.D;
  const int64_t r0 = blockIdx.y * int64_t(kRows), r_last = min(M, r0 + kRows) - 1;
  int64_t cache_len = p.lens_is_int64 ? static_cast<const int64_t*>(p.cache_lens)[b]
                                      : static_cast<const int32_t*>(p.cache_lens)[b];
  cache_len = max(int64_t(0), min(cache_len, s.S_max - s.n));
  // Row r is query r % n. A query's keys end at its own position (a node's ancestors
  // precede it), so the block's rows need keys up to cache_len + their largest query.
  const int64_t max_query = r_last / s.n != r0 / s.n ? s.n - 1 : r_last % s.n;
  const int64_t k_begin = split * p.chunk;
  const int64_t k_end = min(cache_len + max_query + 1, k_begin + p.chunk);

  if (tree) {  // ancestor masks of the row's nodes: parents to shared memory, then walks
    const int64_t* row_parents = p.parents + b * s.n;
    for (int64_t i = threadIdx.x; i < s.n; i += kAttentionThreads) {
      parents_s[i] = static_cast<int32_t>(max(int64_t(-1), min(row_parents[i], s.n)));
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < s.n; i += kAttentionThreads) {
      uint64_t mask = 0;
      // Checked parents precede their nodes; stopping at any that does not keeps every
      // walk short and in bounds.
      for (int64_t c = i; c >= 0; c = parents_s[c] < c ? parents_s[c] : -1) mask |= 1ull << c;
      ancestors_s[i] = mask;
    }
  }
  // Scaled query rows, zero past the group and past D.
  for (int64_t e = threadIdx.x; e < kRows * layout.q_stride; e += kAttentionThreads) {
    const int64_t rr = e / layout.q_stride, d = e % layout.q_stride, r = r0 + rr;
    acc_t value = 0;
    if (r < M && d < D) {
      value = to_acc(p.q[b * s.qs[0] + (kvh * G + r / s.n) * s.qs[1] + (r % s.n) * s.qs[2] +
                         d * s.qs[3]]) * p.scale;
    }
    q_s[e] = value;
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  acc_t row_max[kRowsPerWarp], row_sum[kRowsPerWarp], o[kRowsPerWarp][kDChunks];
  int64_t last_key[kRowsPerWarp];  // causal: the last position row j sees
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int64_t r = r0 + warp * kRowsPerWarp + j;
    row_max[j] = neg_inf;
    row_sum[j] = 0;
    // Rows past the group see every key, so their statistics stay finite.
    last_key[j] = r < M ? cache_len + r % s.n : INT64_MAX;
#pragma unroll
    for (int c = 0; c < kDChunks; ++c) o[j][c] = 0;
  }

  // Every row and page starts a whole number of D-element rows into the caches.
  const bool vectorized = D * sizeof(T) % 16 == 0 && aligned16(p.k_cache) && aligned16(p.v_cache);
  for (int64_t t0 = k_begin; t0 < k_end; t0 += kKeyTile) {
    const int64_t tile = min(int64_t(kKeyTile), k_end - t0);
    // t0 is a multiple of kKeyTile and so is a page's size: the tile lies in one page.
    const int64_t at = p.pages.offset(b, kvh, t0, s.Hkv, D);
    __syncthreads();  // the previous tile is consumed (and, first time, Q and masks staged)
    load_tile(p.k_cache + at, tile, D, vectorized, k_s, layout.k_stride);
    if (!p.kv_shared) load_tile(p.v_cache + at, tile, D, vectorized, v_s, layout.v_stride);
    __syncthreads();

    acc_t score[kRowsPerWarp] = {};
    const T* k_row = k_s + lane * layout.k_stride;
    for (int64_t d = 0; d < layout.q_stride; d += kTPack) {
      const Pack16<T> kp = *reinterpret_cast<const Pack16<T>*>(k_row + d);
      acc_t kv[kTPack];
#pragma unroll
      for (int e = 0; e < kTPack; ++e) kv[e] = to_acc(kp.v[e]);
#pragma unroll
      for (int j = 0; j < kRowsPerWarp; ++j) {
        const acc_t* q_row = q_s + (warp * kRowsPerWarp + j) * layout.q_stride + d;
#pragma unroll
        for (int qp = 0; qp < kQPacks; ++qp) {
          const Pack16<acc_t> qv = load16(q_row + qp * Pack16<acc_t>::kSize);
#pragma unroll
          for (int e = 0; e < Pack16<acc_t>::kSize; ++e) {
            score[j] += qv.v[e] * kv[qp * Pack16<acc_t>::kSize + e];
          }
        }
      }
    }

    acc_t pr[kRowsPerWarp];
    const int64_t key = t0 + lane, block_key = key - cache_len;
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      const int64_t r = r0 + warp * kRowsPerWarp + j;
      bool visible = lane < tile;  // then block_key <= max_query < kMaxTreeNodes
      if (tree) {
        const uint64_t seen = r < M ? ancestors_s[r % s.n] : ~0ull;
        visible = visible && (block_key < 0 || (seen >> block_key & 1));
      } else {
        visible = visible && key <= last_key[j];
      }
      const acc_t sc = visible ? score[j] : neg_inf;
      const acc_t new_max = max(row_max[j], warp_max(sc));
      // A split may hold no key a row can see: keep exp's argument finite then.
      const acc_t shift = new_max == neg_inf ? acc_t(0) : new_max;
      const acc_t alpha = fast_exp(row_max[j] - shift);
      pr[j] = fast_exp(sc - shift);
      row_sum[j] = row_sum[j] * alpha + warp_sum(pr[j]);
      row_max[j] = new_max;
#pragma unroll
      for (int c = 0; c < kDChunks; ++c) o[j][c] *= alpha;
    }
    if (p.kv_shared) {  // V replaces K in the one buffer
      __syncthreads();
      load_tile(p.v_cache + at, tile, D, vectorized, v_s, layout.v_stride);
      __syncthreads();
    }
    for (int t = 0; t < tile; ++t) {
      acc_t pt[kRowsPerWarp];
#pragma unroll
      for (int j = 0; j < kRowsPerWarp; ++j) pt[j] = __shfl_sync(0xffffffffu, pr[j], t);
#pragma unroll
      for (int c = 0; c < kDChunks; ++c) {
        const int64_t d = lane + 32 * c;
        if (d < D) {
          const acc_t v = to_acc(v_s[t * layout.v_stride + d]);
#pragma unroll
          for (int j = 0; j < kRowsPerWarp; ++j) o[j][c] += pt[j] * v;
        }
      }
    }
  }

#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int64_t r = r0 + warp * kRowsPerWarp + j;
    if (r >= M) continue;
    if (num_splits == 1) {  // every key seen: normalize into the output (rows contiguous)
      T* dst = p.out + ((b * s.Hq + kvh * G) * s.n + r) * D;
      const acc_t inv = acc_t(1) / row_sum[j];
#pragma unroll
      for (int c = 0; c < kDChunks; ++c) {
        const int64_t d = lane + 32 * c;
        if (d < D) dst[d] = from_acc<T>(o[j][c] * inv);
      }
      continue;
    }
    const int64_t slot = (z * num_splits + split) * M + r;
#pragma unroll
    for (int c = 0; c < kDChunks; ++c) {
      const int64_t d = lane + 32 * c;
      if (d < D) p.o_part[slot * D + d] = o[j][c];
    }
    if (lane == 0) {
      p.m_part[slot] = row_max[j];
      p.l_part[slot] = row_sum[j];
    }
  }
}

// out row = sum_s e^(m_s - m) o_s / sum_s e^(m_s - m) l_s over the splits s; block
// x = z * M + r (grid.x has room for any B * Hkv * M).
template <typename T>
__global__ void __launch_bounds__(kCombineThreads)
    combine_splits_kernel(const Acc<T>* o_part, const Acc<T>* m_part, const Acc<T>* l_part,
                          AttentionShape s, int num_splits, T* out) {
  using acc_t = Acc<T>;
  const int64_t M = s.Hq / s.Hkv * s.n, z = blockIdx.x / M, r = blockIdx.x % M;
  const int64_t b = z / s.Hkv, kvh = z % s.Hkv;
  const int64_t first = z * num_splits * M + r;  // slot of split 0; splits are M apart
  acc_t m = -INFINITY;
  for (int sp = 0; sp < num_splits; ++sp) m = max(m, m_part[first + sp * M]);
  acc_t denominator = 0;
  for (int sp = 0; sp < num_splits; ++sp) {
    denominator += fast_exp(m_part[first + sp * M] - m) * l_part[first + sp * M];
  }
  T* dst = out + ((b * s.Hq + kvh * (s.Hq / s.Hkv)) * s.n + r) * s.D;
  for (int64_t d = threadIdx.x; d < s.D; d += kCombineThreads) {
    acc_t numerator = 0;
    for (int sp = 0; sp < num_splits; ++sp) {
      const int64_t slot = first + sp * M;
      numerator += fast_exp(m_part[slot] - m) * o_part[slot * s.D + d];
    }
    dst[d] = from_acc<T>(numerator / denominator);
  }
}

struct DeviceInfo {
  int sms, smem_optin;
};

// Queried once per device: attribute queries are cheap but not free, and every layer
// of every step asks.
const DeviceInfo* device_info(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceInfo> known;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = known.find(device);
  if (found != known.end()) return &found->second;
  DeviceInfo info{};
  if (cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
          cudaSuccess) {
    return nullptr;
  }
  return &known.emplace(device, info).first->second;
}

// Raises the kernel's dynamic shared-memory limit once per (kernel, device) and size.
cudaError_t allow_shared_memory(const void* kernel, int64_t bytes) {
  if (bytes <= kDefaultSharedMemory) return cudaSuccess;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int64_t> allowed;
  const std::lock_guard<std::mutex> lock(mutex);
  int64_t& done = allowed[{kernel, device}];
  if (done >= bytes) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(bytes));
  if (err == cudaSuccess) done = bytes;
  return err;
}

template <typename T, int kDChunks, int kRowsPerWarp>
cudaError_t launch_kernel(const AttentionParams<T>& params, const AttentionLaunch& launch,
                   cudaStream_t stream) {
  const auto kernel = attention_kernel<T, kDChunks, kRowsPerWarp>;
  const cudaError_t err =
      allow_shared_memory(reinterpret_cast<const void*>(kernel), launch.plan.smem_bytes);
  if (err != cudaSuccess) return err;
  const AttentionShape& s = params.s;
  const dim3 grid(s.B * s.Hkv, launch.row_blocks, launch.num_splits);
  kernel<<<grid, kAttentionThreads, launch.plan.smem_bytes, stream>>>(params);
  return cudaGetLastError();
}

size_t acc_bytes_of(DType dtype) { return dtype == DType::kFloat64 ? 8 : 4; }
size_t elem_bytes_of(DType dtype) {
  return dtype == DType::kFloat64 ? 8 : dtype == DType::kFloat32 ? 4 : 2;
}

}  // namespace

std::string plan_attention_launch(const AttentionShape& s, DType dtype, bool tree, int64_t longest,
                                  int device, AttentionLaunch* launch) {
  const DeviceInfo* info = device_info(device);
  if (info == nullptr) return "cannot query the device's attributes";
  launch->smem_limit = info->smem_optin;
  // A lower limit on request, to run the small-shared-memory plans of other GPUs here.
  if (const char* cap = std::getenv("CLLM_RT_CUDA_SMEM_LIMIT")) {
    launch->smem_limit = std::min<int64_t>(launch->smem_limit, std::atoll(cap));
  }
  launch->plan = plan_attention(s.D, elem_bytes_of(dtype), acc_bytes_of(dtype), tree,
                                launch->smem_limit);
  if (launch->plan.rows_per_warp == 0) {
    return "head dim " + std::to_string(s.D) + " needs " + std::to_string(launch->plan.smem_bytes) +
           " bytes of shared memory per thread block for this dtype; the device allows " +
           std::to_string(launch->smem_limit);
  }
  const int64_t rows = kAttentionWarps * launch->plan.rows_per_warp, M = s.Hq / s.Hkv * s.n;
  launch->row_blocks = ceil_div(M, rows);
  if (launch->row_blocks > kMaxGridYZ) {
    return std::to_string(M) + " query rows per KV head (Hq / Hkv * n) need " +
           std::to_string(launch->row_blocks) + " thread blocks along grid.y, more than " +
           std::to_string(kMaxGridYZ) + ": split the block";
  }
  if (s.B * s.Hkv > INT32_MAX) return "B * Hkv exceeds grid.x";
  // About two waves of thread blocks, each split keeping at least two key tiles of
  // the keys really present (longest, not S_max: a static cache is mostly empty).
  const int64_t blocks = s.B * s.Hkv * launch->row_blocks;
  const int64_t most = std::max<int64_t>(1, ceil_div(longest, 2 * kKeyTile));
  int64_t splits = std::min({most, std::max<int64_t>(1, ceil_div(2 * info->sms, blocks)),
                             kMaxGridYZ});
  if (s.B * s.Hkv * M > INT32_MAX) splits = 1;  // the combine pass's grid.x

  launch->num_splits = static_cast<int>(splits);
  launch->chunk = ceil_div(ceil_div(longest, splits), kKeyTile) * kKeyTile;
  return "";
}

size_t attention_workspace_bytes(const AttentionShape& s, DType dtype,
                                 const AttentionLaunch& launch) {
  if (launch.num_splits == 1) return 0;
  const int64_t slots = s.B * s.Hkv * launch.num_splits * (s.Hq / s.Hkv * s.n);
  return slots * (s.D + 2) * acc_bytes_of(dtype);
}

cudaError_t attention(const void* q, const void* k_cache, const void* v_cache,
                      const void* cache_lens, bool lens_is_int64, const int64_t* parents,
                      const KvPages& pages, DType dtype, const AttentionShape& s, double scale,
                      const AttentionLaunch& launch, void* workspace, void* out,
                      cudaStream_t stream) {
  if (s.B == 0) return cudaSuccess;
  if (s.D < 1 || s.D > kMaxHeadDim || s.S_max < s.n || launch.num_splits < 1 ||
      pages.page_size % (pages.table != nullptr ? kKeyTile : 1) != 0 ||
      launch.plan.rows_per_warp == 0 || (parents != nullptr && s.n > kMaxTreeNodes)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc_t = Acc<T>;
    AttentionParams<T> params{static_cast<const T*>(q), static_cast<const T*>(k_cache),
                              static_cast<const T*>(v_cache), cache_lens, lens_is_int64, parents,
                              pages, s, static_cast<acc_t>(scale), launch.chunk, launch.plan.kv_shared,
                              nullptr, nullptr, nullptr, static_cast<T*>(out)};
    if (launch.num_splits > 1) {  // workspace: o [slots x D], then m [slots], l [slots]
      const int64_t slots = s.B * s.Hkv * launch.num_splits * (s.Hq / s.Hkv * s.n);
      params.o_part = static_cast<acc_t*>(workspace);
      params.m_part = params.o_part + slots * s.D;
      params.l_part = params.m_part + slots;
    }
    const auto go = [&](auto chunks) {
      constexpr int kChunks = decltype(chunks)::value;
      return launch.plan.rows_per_warp == 4 ? launch_kernel<T, kChunks, 4>(params, launch, stream)
                                            : launch_kernel<T, kChunks, 1>(params, launch, stream);
    };
    cudaError_t err;
    if (s.D <= 32) err = go(std::integral_constant<int, 1>{});
    else if (s.D <= 64) err = go(std::integral_constant<int, 2>{});
    else if (s.D <= 128) err = go(std::integral_constant<int, 4>{});
    else err = go(std::integral_constant<int, 8>{});
    if (err != cudaSuccess || launch.num_splits == 1) return err;
    combine_splits_kernel<T><<<s.B * s.Hkv * (s.Hq / s.Hkv * s.n), kCombineThreads, 0, stream>>>(
        params.o_part, params.m_part, params.l_part, s, launch.num_splits, params.out);
    return cudaGetLastError();
  });
}

}  // namespace cllm_rt::cuda
