// block_attention and tree_attention on CPU: attention of a block of n new queries
// against a ragged KV cache, with grouped-query heads. The two ops differ only in which
// of the block's own keys a query sees: block_attention is causal (query i sees block
// keys j <= i), tree_attention sees node i's ancestors and itself (a 64-bit mask per
// node). One kernel serves both; a tree that is a chain gives block_attention's result.
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

// Which of the block's keys each of a task's Mq query rows sees. Causal (ancestors ==
// nullptr): row r is query qi[r] and sees block key j iff j <= qi[r]. Tree: it sees
// block key j iff bit j of ancestors[r] is set. Padding rows see every key (qi = +inf,
// all bits set), so their statistics stay finite.
template <typename acc_t>
struct RowMask {
  const acc_t* qi;
  const uint64_t* ancestors;
};

// Folds one tile of transposed scores st [Tn x Mq] into the running softmax of the
// Mq query rows: masks keys a row may not see, turns the scores into exp(s - max),
// and leaves in alpha the factor by which each row's output so far must shrink.
// Key row t is block key first_block_key + t (negative: a cache key, which every row
// sees).
template <typename acc_t>
void online_softmax_tile(acc_t* st, int64_t Tn, int64_t Mq, int64_t first_block_key,
                         RowMask<acc_t> mask, acc_t* row_max, acc_t* row_sum, acc_t* alpha,
                         acc_t* tile_buf) {
  using V = simd::Vec<acc_t>;
  constexpr int kW = sizeof(V) / sizeof(acc_t);
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const V neg_inf = simd::broadcast<V>(kNegInf);
  for (int64_t r = 0; r < Mq; r += kW) simd::store(tile_buf + r, neg_inf);
  for (int64_t t = 0; t < Tn; ++t) {  // mask, and the tile's max per row
    acc_t* s = st + t * Mq;
    const int64_t j = first_block_key + t;
    // A tree touches at most kMaxTreeNodes keys: a scalar bit test per row costs
    // nothing next to the tile's products.
    if (mask.ancestors != nullptr && j >= 0) {
      for (int64_t r = 0; r < Mq; ++r) {
        if (!(mask.ancestors[r] >> j & 1)) s[r] = kNegInf;
      }
    }
    const bool causal_hides = mask.ancestors == nullptr && j > 0;  // j == 0 is seen by all
    for (int64_t r = 0; r < Mq; r += kW) {
      V v = simd::load<V>(s + r);
      if (causal_hides) {
        v = simd::load<V>(mask.qi + r) < static_cast<acc_t>(j) ? neg_inf : v;
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

// Reads one byte of every 64-byte line of a K tile and its V tile, both `bytes` long, so the lines are
// requested all at once, ahead of the products. A decoding step reaches a layer's cache after streaming
// megabytes of weights, so the tiles come from memory, and the products' own loads, a few lines at a
// time, leave it waiting on latency: one-token attention over 256 cached SmolLM2 keys took ~53 us a layer
// cold against ~19 us warm (Zen 5, 1 thread), ~35 us cold with these loads first. Loads rather than
// prefetch instructions: prefetching the same lines gave ~45 us.
inline void touch_tile(const void* k_tile, const void* v_tile, int64_t bytes) {
  const volatile char* k = static_cast<const volatile char*>(k_tile);
  const volatile char* v = static_cast<const volatile char*>(v_tile);
  char sink = 0;
  for (int64_t offset = 0; offset < bytes; offset += 64) sink ^= k[offset] ^ v[offset];
  asm volatile("" : : "r"(sink));
}

// How far ahead of the products touch_tile reads: K and V of this many bytes together, well
// within L2, so that a long context's lines are not evicted before their products reach them.
constexpr int64_t kTouchAheadBytes = 256 << 10;

// ancestors: nullptr (causal), or [B * n] masks, bit j of ancestors[b * n + i] set iff
// node i of row b sees block key j.
// pages: where each row's positions lie in k_cache/v_cache (common.h; dense or paged).
template <typename scalar_t>
void attention_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const int64_t* cache_lens, const uint64_t* ancestors, const KvPages& pages,
                      double scale, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = q.size(0), Hq = q.size(1), n = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(1);
  const int64_t G = Hq / Hkv, M = G * n, groups = B * Hkv;
  // Fewer (batch row, KV head) groups than threads: split each group's query rows
  // into parts (each re-reads the K/V tiles) so no thread idles.
  const int64_t parts = std::clamp<int64_t>(at::get_num_threads() / groups, 1,
                                            (M + kVecLanes<acc_t> - 1) / kVecLanes<acc_t>);
  // rows per part, padded to whole vectors (a one-token step's 3 query rows to 8, not 16: the
  // score product's work is Mq columns, whatever the rows)
  const int64_t Mq = round_up((M + parts - 1) / parts, kVecLanes<acc_t>);
  const int64_t num_parts = (M + Mq - 1) / Mq;
  const int64_t Dp = round_up(D, kNR<acc_t>);
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k_cache.const_data_ptr<scalar_t>();
  const scalar_t* vp = v_cache.const_data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2), qs3 = q.stride(3);

  at::parallel_for(0, groups * num_parts, 1, [&](int64_t begin, int64_t end) {
    // Per-thread panels: (scale Q)^T, S^T, K and V tiles only when they must be widened
    // or padded (float32 ones are read in the cache, and their buffers stay empty rather
    // than 2 x 32 KB zeroed per call), output, row statistics.
    constexpr bool kWiden = !std::is_same_v<scalar_t, acc_t>;
    std::vector<acc_t> qt(D * Mq), st(kTile * Mq), kbuf(kWiden ? kTile * D : 0),
        vbuf(kWiden || Dp != D ? kTile * Dp : 0), obuf(Mq * Dp), qi(Mq), row_max(Mq),
        row_sum(Mq), alpha(Mq), tile_buf(Mq);
    std::vector<uint64_t> row_ancestors(ancestors != nullptr ? Mq : 0);
    const RowMask<acc_t> mask{qi.data(), ancestors != nullptr ? row_ancestors.data() : nullptr};
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task / num_parts, b = group / Hkv, kvh = group % Hkv;
      const int64_t first_row = task % num_parts * Mq, rows = std::min(Mq, M - first_row);
      const int64_t cache_len = cache_lens[b], L = cache_len + n;
      // Local row r is group row first_row + r: query (first_row + r) % n of head
      // kvh*G + (first_row + r) / n. Padding rows see every key.
      std::fill(qt.begin(), qt.end(), acc_t(0));
      for (int64_t r = 0; r < Mq; ++r) {
        const int64_t row = first_row + r;
        qi[r] = r < rows ? acc_t(row % n) : std::numeric_limits<acc_t>::infinity();
        if (ancestors != nullptr) row_ancestors[r] = r < rows ? ancestors[b * n + row % n] : ~0ull;
        if (r >= rows) continue;
        const scalar_t* src = qp + b * qs0 + (kvh * G + row / n) * qs1 + (row % n) * qs2;
        for (int64_t d = 0; d < D; ++d) {
          qt[d * Mq + r] = static_cast<acc_t>(src[d * qs3]) * static_cast<acc_t>(scale);
        }
      }
      std::fill(obuf.begin(), obuf.end(), acc_t(0));
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), acc_t(0));
      // A tile never straddles two pages (a dense row is one page).
      const auto tile_rows = [&](int64_t t0) { return std::min({kTile, L - t0, pages.run(t0)}); };
      const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
      const int64_t touch_ahead = std::max<int64_t>(kTile, kTouchAheadBytes / (2 * row_bytes));
      int64_t touched = 0;  // positions whose K and V lines have been requested
      for (int64_t t0 = 0, Tn; t0 < L; t0 += Tn) {
        Tn = tile_rows(t0);
        for (int64_t Tt; touched < std::min(L, t0 + touch_ahead); touched += Tt) {
          Tt = tile_rows(touched);
          const int64_t tile_at = pages.offset(b, kvh, touched, Hkv, D);
          touch_tile(kp + tile_at, vp + tile_at, Tt * row_bytes);
        }
        const int64_t at = pages.offset(b, kvh, t0, Hkv, D);
        const acc_t* k_tile = rows_as_acc(kp + at, Tn, D, kbuf.data(), D);
        gemm<acc_t, false>(Tn, Mq, D, k_tile, {D, 1}, qt.data(), Mq, st.data(), Mq);
        online_softmax_tile(st.data(), Tn, Mq, t0 - cache_len, mask, row_max.data(),
                            row_sum.data(), alpha.data(), tile_buf.data());
        for (int64_t r = 0; r < rows; ++r) {
          if (alpha[r] != acc_t(1)) {
            for (int64_t d = 0; d < Dp; ++d) obuf[r * Dp + d] *= alpha[r];
          }
        }
        const acc_t* v_tile = rows_as_acc(vp + at, Tn, D, vbuf.data(), Dp);
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

// The value checks shared by both ops, then the kernel; ancestors as in attention_kernel.
at::Tensor attention_cpu(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& cache_lens,
                         const std::optional<at::Tensor>& page_table, int64_t S_max,
                         const uint64_t* ancestors, double scale) {
  const int64_t B = q.size(0), n = q.size(2);
  check_cache_lens_values(op, cache_lens, n, S_max);
  at::Tensor table;
  KvPages pages{nullptr, 1, S_max, B};
  if (page_table.has_value()) {
    check_page_table_values(op, *page_table, k_cache.size(0));
    table = page_table->contiguous();
    pages = {table.const_data_ptr<int64_t>(), table.size(1), k_cache.size(2), k_cache.size(0)};
  }
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous [B, Hq, n, D]
  if (B == 0) return out;
  const at::Tensor lens = cache_lens.to(at::kLong).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_cpu", [&] {
    attention_kernel<scalar_t>(q, k_cache, v_cache, lens.const_data_ptr<int64_t>(), ancestors,
                               pages, scale, out);
  });
  return out;
}

}  // namespace

at::Tensor block_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& cache_lens,
                               double scale, const std::optional<at::Tensor>& page_table) {
  const int64_t S_max = check_attention("block_attention", q, k_cache, v_cache, cache_lens, page_table);
  return attention_cpu("block_attention", q, k_cache, v_cache, cache_lens, page_table, S_max, nullptr,
                       scale);
}

at::Tensor tree_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const at::Tensor& cache_lens,
                              const at::Tensor& parents_in, double scale,
                              const std::optional<at::Tensor>& page_table) {
  const int64_t S_max = check_tree_attention(q, k_cache, v_cache, cache_lens, parents_in, page_table);
  check_parents_values("tree_attention", parents_in);
  const int64_t B = q.size(0), n = q.size(2);
  // Topological order makes one forward pass enough: a parent's mask is final first.
  const at::Tensor parents = parents_in.contiguous();
  const int64_t* p = parents.const_data_ptr<int64_t>();
  std::vector<uint64_t> ancestors(B * n);
  for (int64_t node = 0; node < B * n; ++node) {
    const int64_t i = node % n, parent = p[node];
    ancestors[node] = (uint64_t(1) << i) | (parent >= 0 ? ancestors[node - i + parent] : 0);
  }
  return attention_cpu("tree_attention", q, k_cache, v_cache, cache_lens, page_table, S_max,
                       ancestors.data(), scale);
}

TORCH_LIBRARY_IMPL(cllm_rt, CPU, m) {
  m.impl("block_attention", &block_attention_cpu);
  m.impl("tree_attention", &tree_attention_cpu);
}

}  // namespace cllm_rt
