// block_attention on CUDA: split-KV ("flash-decoding", Dao et al. 2023) attention of
// a block of n queries against a ragged KV cache, causal inside the block, GQA.
//
// Pass 1: thread block (split, row block, b * Hkv + kv_head) takes one chunk of key
// positions and up to kRowsPerBlock of the G * n query rows that share the KV head,
// so each K/V tile is fetched once for all of them. K/V tiles of kKeyTile positions
// are staged in shared memory (16-byte global loads, widened to the accumulation
// type). Each warp owns kRowsPerWarp query rows: lane t scores key t of the tile,
// the online softmax (Milakov & Gimelshein 2018) runs on warp shuffles, and the
// lanes then accumulate P * V over head-dim columns lane, lane + 32, ... The split
// writes its unnormalized output and (max, sum) per row.
// Pass 2: one thread block per query row rescales and sums the splits.
// cache_lens are read on the device only and clamped to [0, S_max - n].
#include <algorithm>
#include <cmath>

#include "common.cuh"

namespace cllm_rt::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 4;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kKeyTile = 32;  // one key per lane
constexpr int kCombineThreads = 128;

__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t x) {
  for (int offset = 16; offset > 0; offset /= 2) {
    x = max(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}

// Shared-memory row strides (in acc_t): rows are padded to 16 bytes so rows can be
// read as 16-byte packs, and K rows get one more pack so the lanes' row reads fall
// in different banks.
struct SmemLayout {
  int64_t q_stride, k_stride, v_stride;
  template <typename acc_t>
  __host__ __device__ static SmemLayout of(int64_t D) {
    const int64_t pack = 16 / sizeof(acc_t), padded = ceil_div(D, pack) * pack;
    return {padded, padded + pack, D};
  }
  template <typename acc_t>
  __host__ __device__ int64_t bytes() const {
    return (kRowsPerBlock * q_stride + kKeyTile * (k_stride + v_stride)) * sizeof(acc_t);
  }
};

// dst[r][c] = src[r * D + c] for r < rows (widened), zero for rows..kKeyTile.
template <typename T, typename acc_t>
__device__ __forceinline__ void load_tile(const T* src, int64_t rows, int64_t D, bool vectorized,
                                          acc_t* dst, int64_t dst_stride) {
  if (vectorized) {  // D * sizeof(T) % 16 == 0: a pack never straddles two rows
    constexpr int kPack = Pack16<T>::kSize;
    for (int64_t p = threadIdx.x; p < rows * D / kPack; p += kThreads) {
      const Pack16<T> pack = load16(src + p * kPack);
      const int64_t r = p * kPack / D, c = p * kPack % D;
#pragma unroll
      for (int e = 0; e < kPack; ++e) dst[r * dst_stride + c + e] = to_acc(pack.v[e]);
    }
  } else {
    for (int64_t e = threadIdx.x; e < rows * D; e += kThreads) {
      dst[(e / D) * dst_stride + e % D] = to_acc(src[e]);
    }
  }
  for (int64_t e = threadIdx.x; e < (kKeyTile - rows) * D; e += kThreads) {
    dst[(rows + e / D) * dst_stride + e % D] = acc_t(0);
  }
}

template <typename T, int kDChunks>
__global__ void __launch_bounds__(kThreads)
    attention_split_kernel(const T* __restrict__ q, const T* __restrict__ k_cache,
                           const T* __restrict__ v_cache, const void* cache_lens,
                           bool lens_is_int64, BlockAttentionShape s, Acc<T> scale,
                           int64_t chunk, Acc<T>* o_part, Acc<T>* m_part, Acc<T>* l_part) {
  using acc_t = Acc<T>;
  constexpr int kAccPack = Pack16<acc_t>::kSize;
  const acc_t neg_inf = -INFINITY;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const SmemLayout layout = SmemLayout::of<acc_t>(s.D);
  acc_t* q_s = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* k_s = q_s + kRowsPerBlock * layout.q_stride;
  acc_t* v_s = k_s + kKeyTile * layout.k_stride;

  const int64_t split = blockIdx.x, num_splits = gridDim.x, z = blockIdx.z;
  const int64_t b = z / s.Hkv, kvh = z % s.Hkv, G = s.Hq / s.Hkv, M = G * s.n, D = s.D;
  const int64_t r0 = blockIdx.y * kRowsPerBlock;
  int64_t cache_len = lens_is_int64 ? static_cast<const int64_t*>(cache_lens)[b]
                                    : static_cast<const int32_t*>(cache_lens)[b];
  cache_len = max(int64_t(0), min(cache_len, s.S_max - s.n));
  const int64_t k_begin = split * chunk, k_end = min(cache_len + s.n, k_begin + chunk);

  // Scaled query rows, zero past the group and past D.
  for (int64_t e = threadIdx.x; e < kRowsPerBlock * layout.q_stride; e += kThreads) {
    const int64_t rr = e / layout.q_stride, d = e % layout.q_stride, r = r0 + rr;
    acc_t value = 0;
    if (r < M && d < D) {
      value = to_acc(q[b * s.qs[0] + (kvh * G + r / s.n) * s.qs[1] + (r % s.n) * s.qs[2] +
                       d * s.qs[3]]) * scale;
    }
    q_s[e] = value;
  }
  // K's padding columns stay zero: tile loads write columns < D only.
  const int64_t k_pad = layout.k_stride - D;
  for (int64_t e = threadIdx.x; e < kKeyTile * k_pad; e += kThreads) {
    k_s[(e / k_pad) * layout.k_stride + D + e % k_pad] = acc_t(0);
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  acc_t row_max[kRowsPerWarp], row_sum[kRowsPerWarp], o[kRowsPerWarp][kDChunks];
  int64_t last_key[kRowsPerWarp];  // the last position row j may see
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

  const T* k_head = k_cache + (b * s.Hkv + kvh) * s.S_max * D;
  const T* v_head = v_cache + (b * s.Hkv + kvh) * s.S_max * D;
  const bool vectorized = D * sizeof(T) % 16 == 0 && aligned16(k_head) && aligned16(v_head);
  for (int64_t t0 = k_begin; t0 < k_end; t0 += kKeyTile) {
    const int64_t tile = min(int64_t(kKeyTile), k_end - t0);
    __syncthreads();  // the previous tile is consumed
    load_tile(k_head + t0 * D, tile, D, vectorized, k_s, layout.k_stride);
    load_tile(v_head + t0 * D, tile, D, vectorized, v_s, layout.v_stride);
    __syncthreads();

    acc_t score[kRowsPerWarp] = {};
    const acc_t* k_row = k_s + lane * layout.k_stride;
    for (int64_t d = 0; d < layout.q_stride; d += kAccPack) {
      const Pack16<acc_t> kv = load16(k_row + d);
#pragma unroll
      for (int j = 0; j < kRowsPerWarp; ++j) {
        const Pack16<acc_t> qv = load16(q_s + (warp * kRowsPerWarp + j) * layout.q_stride + d);
#pragma unroll
        for (int e = 0; e < kAccPack; ++e) score[j] += qv.v[e] * kv.v[e];
      }
    }

    acc_t p[kRowsPerWarp];
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      const bool visible = lane < tile && t0 + lane <= last_key[j];
      const acc_t sc = visible ? score[j] : neg_inf;
      const acc_t new_max = max(row_max[j], warp_max(sc));
      // A split may hold no key a row can see: keep exp's argument finite then.
      const acc_t shift = new_max == neg_inf ? acc_t(0) : new_max;
      const acc_t alpha = fast_exp(row_max[j] - shift);
      p[j] = fast_exp(sc - shift);
      row_sum[j] = row_sum[j] * alpha + warp_sum(p[j]);
      row_max[j] = new_max;
#pragma unroll
      for (int c = 0; c < kDChunks; ++c) o[j][c] *= alpha;
    }
    for (int t = 0; t < tile; ++t) {
      acc_t pt[kRowsPerWarp];
#pragma unroll
      for (int j = 0; j < kRowsPerWarp; ++j) pt[j] = __shfl_sync(0xffffffffu, p[j], t);
#pragma unroll
      for (int c = 0; c < kDChunks; ++c) {
        const int64_t d = lane + 32 * c;
        if (d < D) {
          const acc_t v = v_s[t * layout.v_stride + d];
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
    const int64_t slot = (z * num_splits + split) * M + r;
#pragma unroll
    for (int c = 0; c < kDChunks; ++c) {
      const int64_t d = lane + 32 * c;
      if (d < D) o_part[slot * D + d] = o[j][c];
    }
    if (lane == 0) {
      m_part[slot] = row_max[j];
      l_part[slot] = row_sum[j];
    }
  }
}

// out row = sum_s e^(m_s - m) o_s / sum_s e^(m_s - m) l_s over the splits s.
template <typename T>
__global__ void __launch_bounds__(kCombineThreads)
    combine_splits_kernel(const Acc<T>* o_part, const Acc<T>* m_part, const Acc<T>* l_part,
                          BlockAttentionShape s, int num_splits, T* out) {
  using acc_t = Acc<T>;
  const int64_t r = blockIdx.x, z = blockIdx.y, M = s.Hq / s.Hkv * s.n;
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

template <typename T, int kDChunks>
cudaError_t launch(const T* q, const T* k, const T* v, const void* cache_lens, bool lens_is_int64,
                   const BlockAttentionShape& s, double scale, int num_splits, void* workspace,
                   T* out, cudaStream_t stream) {
  using acc_t = Acc<T>;
  const int64_t M = s.Hq / s.Hkv * s.n, slots = s.B * s.Hkv * num_splits * M;
  acc_t* o_part = static_cast<acc_t*>(workspace);
  acc_t* m_part = o_part + slots * s.D;
  acc_t* l_part = m_part + slots;
  const int64_t chunk = ceil_div(ceil_div(s.S_max, num_splits), kKeyTile) * kKeyTile;
  const size_t smem = SmemLayout::of<acc_t>(s.D).template bytes<acc_t>();
  auto kernel = attention_split_kernel<T, kDChunks>;
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(num_splits, ceil_div(M, kRowsPerBlock), s.B * s.Hkv);
  kernel<<<grid, kThreads, smem, stream>>>(q, k, v, cache_lens, lens_is_int64, s,
                                           static_cast<acc_t>(scale), chunk, o_part, m_part,
                                           l_part);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  combine_splits_kernel<T><<<dim3(M, s.B * s.Hkv), kCombineThreads, 0, stream>>>(
      o_part, m_part, l_part, s, num_splits, out);
  return cudaGetLastError();
}

}  // namespace

int block_attention_num_splits(const BlockAttentionShape& s, int device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    sms = 1;
  }
  // About two waves of thread blocks, each split keeping at least two key tiles.
  const int64_t blocks = s.B * s.Hkv * ceil_div(s.Hq / s.Hkv * s.n, kRowsPerBlock);
  const int64_t most = std::max<int64_t>(1, ceil_div(s.S_max, 2 * kKeyTile));
  return static_cast<int>(std::min(most, std::max<int64_t>(1, ceil_div(2 * sms, blocks))));
}

size_t block_attention_workspace_bytes(const BlockAttentionShape& s, int num_splits) {
  // Sized for float64 partials, so one size serves every dtype.
  const int64_t slots = s.B * s.Hkv * num_splits * (s.Hq / s.Hkv * s.n);
  return slots * (s.D + 2) * sizeof(double);
}

cudaError_t block_attention(const void* q, const void* k_cache, const void* v_cache,
                            const void* cache_lens, bool lens_is_int64, DType dtype,
                            const BlockAttentionShape& shape, double scale, int num_splits,
                            void* workspace, void* out, cudaStream_t stream) {
  if (shape.B == 0) return cudaSuccess;
  if (shape.D < 1 || shape.D > 256 || shape.S_max < shape.n || num_splits < 1 ||
      shape.B * shape.Hkv > 65535) {  // grid.z
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T *qt = static_cast<const T*>(q), *kt = static_cast<const T*>(k_cache),
            *vt = static_cast<const T*>(v_cache);
    T* ot = static_cast<T*>(out);
    const auto go = [&](auto chunks) {
      return launch<T, decltype(chunks)::value>(qt, kt, vt, cache_lens, lens_is_int64, shape,
                                                scale, num_splits, workspace, ot, stream);
    };
    if (shape.D <= 32) return go(std::integral_constant<int, 1>{});
    if (shape.D <= 64) return go(std::integral_constant<int, 2>{});
    if (shape.D <= 128) return go(std::integral_constant<int, 4>{});
    return go(std::integral_constant<int, 8>{});
  });
}

}  // namespace cllm_rt::cuda
