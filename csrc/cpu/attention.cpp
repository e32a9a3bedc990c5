// block_attention on CPU: attention of a block of n new queries against a ragged
// KV cache, causal inside the block, with grouped-query heads.
//
// FlashAttention-style single pass (Dao et al. 2022; the online softmax of Milakov &
// Gimelshein 2018): keys and values are visited in tiles of kTile positions and the
// softmax is rescaled as the running row maximum grows, so scores never exceed one
// tile. One task per (batch row, KV head): the G = Hq / Hkv query heads that share
// the KV head and their n queries form one panel of M = G*n query rows, so each K/V
// tile is read from the cache once per group, never once per query head (a group's
// rows are split across tasks only when there are fewer groups than threads).
// Scores are kept transposed, S^T [keys x query rows] = K_tile * (scale Q)^T: the
// cache's K rows are the product's left operand as they lie (no transposed copy),
// and the softmax statistics of all query rows advance together in vectors along a
// key row. O += P * V then reads P straight out of S^T. Both products run through
// the register-blocked micro-kernel of gemm.h; everything accumulates in float32
// (float64 for float64 inputs).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../checks.h"
#include "gemm.h"

namespace cllm_rt {
namespace {

constexpr int64_t kTile = 128;  // keys per tile

// Folds one tile of transposed scores st [Tn x Mq] into the running softmax of the
// Mq query rows: masks keys a row may not see, turns the scores into exp(s - max),
// and leaves in alpha the factor by which each row's output so far must shrink.
// Row r is query qi[r]; key row t is position t0 + t; a row sees positions
// <= cache_len + qi, i.e. hides key t when qi < t0 + t - cache_len (padding rows
// have qi = +inf and see everything).
template <typename acc_t>
void online_softmax_tile(acc_t* st, int64_t Tn, int64_t Mq, int64_t first_hidden_offset,
                         const acc_t* qi, acc_t* row_max, acc_t* row_sum, acc_t* alpha,
                         acc_t* tile_buf) {
  using V = simd::Vec<acc_t>;
  constexpr int kW = sizeof(V) / sizeof(acc_t);
  const V neg_inf = simd::broadcast<V>(-std::numeric_limits<acc_t>::infinity());
  for (int64_t r = 0; r < Mq; r += kW) simd::store(tile_buf + r, neg_inf);
  for (int64_t t = 0; t < Tn; ++t) {  // mask, and the tile's max per row
    acc_t* s = st + t * Mq;
    const int64_t threshold = first_hidden_offset + t;
    for (int64_t r = 0; r < Mq; r += kW) {
      V v = simd::load<V>(s + r);
      if (threshold > 0) {
        v = simd::load<V>(qi + r) < static_cast<acc_t>(threshold) ? neg_inf : v;
        simd::store(s + r, v);
      }
      simd::store(tile_buf + r, simd::max(simd::load<V>(tile_buf + r), v));
    }
  }
  for (int64_t r = 0; r < Mq; r += kW) {  // new maxima; tile_buf becomes the tile's sums
    const V old_max = simd::load<V>(row_max + r);
    const V new_max = simd::max(old_max, simd::load<V>(tile_buf + r));
    simd::store(alpha + r, simd::exp(old_max - new_max));  // 0 on the first tile
    simd::store(row_max + r, new_max);
    simd::store(tile_buf + r, V{});
  }
  for (int64_t t = 0; t < Tn; ++t) {
    acc_t* s = st + t * Mq;
    for (int64_t r = 0; r < Mq; r += kW) {
      const V p = simd::exp(simd::load<V>(s + r) - simd::load<V>(row_max + r));
      simd::store(s + r, p);
      simd::store(tile_buf + r, simd::load<V>(tile_buf + r) + p);
    }
  }
  for (int64_t r = 0; r < Mq; r += kW) {
    simd::store(row_sum + r, simd::load<V>(row_sum + r) * simd::load<V>(alpha + r) +
                                 simd::load<V>(tile_buf + r));
  }
}

template <typename scalar_t>
void block_attention_kernel(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const int64_t* cache_lens, double scale,
                            at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = q.size(0), Hq = q.size(1), n = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(1), S_max = k_cache.size(2);
  const int64_t G = Hq / Hkv, M = G * n, groups = B * Hkv;
  // Fewer (batch row, KV head) groups than threads: split each group's query rows
  // into parts (each re-reads the K/V tiles) so no thread idles.
  const int64_t parts = std::clamp<int64_t>(at::get_num_threads() / groups, 1,
                                            (M + kNR<acc_t> - 1) / kNR<acc_t>);
  const int64_t Mq = round_up((M + parts - 1) / parts, kNR<acc_t>);  // rows per part, padded
  const int64_t num_parts = (M + Mq - 1) / Mq;
  const int64_t Dp = round_up(D, kNR<acc_t>);
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k_cache.const_data_ptr<scalar_t>();
  const scalar_t* vp = v_cache.const_data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2), qs3 = q.stride(3);

  at::parallel_for(0, groups * num_parts, 1, [&](int64_t begin, int64_t end) {
    // Per-thread panels: (scale Q)^T, S^T, K and V tiles when they must be widened
    // or padded (float32 ones are read in the cache), output, row statistics.
    std::vector<acc_t> qt(D * Mq), st(kTile * Mq), kbuf(kTile * D), vbuf(kTile * Dp),
        obuf(Mq * Dp), qi(Mq), row_max(Mq), row_sum(Mq), alpha(Mq), tile_buf(Mq);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / num_parts, b = group / Hkv, kvh = group % Hkv;
      const int64_t first_row = task % num_parts * Mq, rows = std::min(Mq, M - first_row);
      const int64_t cache_len = cache_lens[b], L = cache_len + n;
      // Local row r is group row first_row + r: query (first_row + r) % n of head
      // kvh*G + (first_row + r) / n. Padding rows see every key (qi = +inf).
      std::fill(qt.begin(), qt.end(), acc_t(0));
      for (int64_t r = 0; r < Mq; ++r) {
        const int64_t row = first_row + r;
        qi[r] = r < rows ? acc_t(row % n) : std::numeric_limits<acc_t>::infinity();
        if (r >= rows) continue;
        const scalar_t* src = qp + b * qs0 + (kvh * G + row / n) * qs1 + (row % n) * qs2;
        for (int64_t d = 0; d < D; ++d) {
          qt[d * Mq + r] = static_cast<acc_t>(src[d * qs3]) * static_cast<acc_t>(scale);
        }
      }
      std::fill(obuf.begin(), obuf.end(), acc_t(0));
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), acc_t(0));
      const scalar_t* kv_k = kp + group * S_max * D;
      const scalar_t* kv_v = vp + group * S_max * D;

      for (int64_t t0 = 0; t0 < L; t0 += kTile) {
        const int64_t Tn = std::min(kTile, L - t0);
        const acc_t* k_tile = rows_as_acc(kv_k + t0 * D, Tn, D, kbuf.data(), D);
        gemm<acc_t, false>(Tn, Mq, D, k_tile, {D, 1}, qt.data(), Mq, st.data(), Mq);
        online_softmax_tile(st.data(), Tn, Mq, t0 - cache_len, qi.data(), row_max.data(),
                            row_sum.data(), alpha.data(), tile_buf.data());
        for (int64_t r = 0; r < rows; ++r) {
          if (alpha[r] != acc_t(1)) {
            for (int64_t d = 0; d < Dp; ++d) obuf[r * Dp + d] *= alpha[r];
          }
        }
        const acc_t* v_tile = rows_as_acc(kv_v + t0 * D, Tn, D, vbuf.data(), Dp);
        gemm<acc_t, true>(rows, Dp, Tn, st.data(), {1, Mq}, v_tile, Dp, obuf.data(), Dp);
      }

      // A group's rows are contiguous in out [B, Hq, n, D].
      scalar_t* dst = op + ((b * Hq + kvh * G) * n + first_row) * D;
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t inv = acc_t(1) / row_sum[r];
        for (int64_t d = 0; d < D; ++d) {
          dst[r * D + d] = static_cast<scalar_t>(obuf[r * Dp + d] * inv);
        }
      }
    }
  });
}

}  // namespace

at::Tensor block_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& cache_lens,
                               double scale) {
  check_block_attention(q, k_cache, v_cache, cache_lens);
  const int64_t B = q.size(0), Hq = q.size(1), n = q.size(2), D = q.size(3);
  const int64_t S_max = k_cache.size(2);
  const at::Tensor lens = cache_lens.to(at::kLong).contiguous();
  const int64_t* lp = lens.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 0 && lp[b] + n <= S_max,
                "block_attention: need 0 <= cache_lens[b] and cache_lens[b] + n <= S_max");
  }
  at::Tensor out = at::empty({B, Hq, n, D}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(),
                                  "block_attention_cpu", [&] {
                                    block_attention_kernel<scalar_t>(q, k_cache, v_cache, lp,
                                                                     scale, out);
                                  });
  return out;
}

TORCH_LIBRARY_IMPL(cllm_rt, CPU, m) { m.impl("block_attention", &block_attention_cpu); }

}  // namespace cllm_rt
