// lm_head_argmax on CPU: greedy tokens argmax(hidden @ weight.T) without the logits.
//
// The vocabulary is cut into tiles of kVocabTile weight rows; threads take
// contiguous runs of tiles. Per tile the logits are computed transposed,
// L^T [Tn x R] = W_tile * H^T, so the weight rows are the left operand of the gemm.h
// micro-kernel as they lie in memory (float32) or widened row by row (bf16/f16),
// and every hidden row's running argmax advances in vectors along a logits row.
// Threads' results merge at the end with torch.argmax's tie and NaN rules, which
// do not depend on the order of merging.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <vector>

#include "../checks.h"
#include "argmax.h"
#include "gemm.h"

namespace cllm_rt {
namespace {

constexpr int64_t kVocabTile = 128;  // weight rows per tile
constexpr int64_t kDepthTile = 256;  // hidden features per pass: B panels stay in L1

// Running argmax of each of the Rq columns of a stream of [rows x Rq] tiles whose
// rows arrive in increasing vocabulary order: strict '>' keeps the first maximum,
// and a column's first NaN is remembered apart (NaN wins over any value).
template <typename acc_t>
struct ColumnArgMax {
  using V = simd::Vec<acc_t>;
  using VI = simd::Vec<simd::MaskInt<acc_t>>;
  static constexpr int kW = sizeof(V) / sizeof(acc_t);
  std::vector<V> value;
  std::vector<VI> index, nan, nan_index;

  explicit ColumnArgMax(int64_t Rq)
      : value(Rq / kW, simd::broadcast<V>(-std::numeric_limits<acc_t>::infinity())),
        index(Rq / kW, VI{} - 1), nan(Rq / kW, VI{}), nan_index(Rq / kW, VI{}) {}

  void update(const acc_t* tile, int64_t rows, int64_t Rq, int64_t first_index) {
    for (int64_t t = 0; t < rows; ++t) {
      const VI position = simd::broadcast<VI>(static_cast<simd::MaskInt<acc_t>>(first_index + t));
      for (int64_t c = 0; c < Rq / kW; ++c) {
        const V v = simd::load<V>(tile + t * Rq + c * kW);
        // index < 0: nothing seen yet, so even -inf is taken.
        const VI take = (v > value[c]) | (index[c] < 0);
        value[c] = take ? v : value[c];
        index[c] = take ? position : index[c];
        const VI is_nan = v != v;
        nan_index[c] = (is_nan & ~nan[c]) ? position : nan_index[c];
        nan[c] |= is_nan;
      }
    }
  }

  ArgMax<acc_t> column(int64_t r) const {
    const int64_t c = r / kW, l = r % kW;
    if (nan[c][l]) return {std::numeric_limits<acc_t>::quiet_NaN(), nan_index[c][l], true};
    return {value[c][l], index[c][l], false};
  }
};

template <typename scalar_t>
void lm_head_argmax_kernel(const at::Tensor& hidden, const at::Tensor& weight, int64_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t R = hidden.size(0) * hidden.size(1), d = hidden.size(2), V = weight.size(0);
  const int64_t Rq = round_up(R, kNR<acc_t>);
  // H^T [d x Rq], zero columns past R.
  std::vector<acc_t> ht(d * Rq, acc_t(0));
  const scalar_t* h = hidden.const_data_ptr<scalar_t>();
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t k = 0; k < d; ++k) ht[k * Rq + r] = static_cast<acc_t>(h[r * d + k]);
  }
  const scalar_t* w = weight.const_data_ptr<scalar_t>();

  const int64_t tiles = (V + kVocabTile - 1) / kVocabTile;
  std::vector<ArgMax<acc_t>> best(R, {acc_t(0), -1, false});
  std::mutex best_mutex;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    ColumnArgMax<acc_t> running(Rq);
    // Weight rows are widened into wbuf unless they are float32/float64 already.
    std::vector<acc_t> wbuf(std::is_same_v<scalar_t, acc_t> ? 0 : kVocabTile * d);
    std::vector<acc_t> lt(kVocabTile * Rq);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t v0 = tile * kVocabTile, Tn = std::min(kVocabTile, V - v0);
      const acc_t* w_tile = rows_as_acc(w + v0 * d, Tn, d, wbuf.data(), d);
      for (int64_t k0 = 0; k0 < d; k0 += kDepthTile) {
        const int64_t K = std::min(kDepthTile, d - k0);
        const auto product = k0 == 0 ? gemm<acc_t, false> : gemm<acc_t, true>;
        product(Tn, Rq, K, w_tile + k0, {d, 1}, ht.data() + k0 * Rq, Rq, lt.data(), Rq);
      }
      running.update(lt.data(), Tn, Rq, v0);
    }
    const std::lock_guard<std::mutex> lock(best_mutex);  // once per thread
    for (int64_t r = 0; r < R; ++r) best[r] = merge_argmax(best[r], running.column(r));
  });
  for (int64_t r = 0; r < R; ++r) out[r] = best[r].index;
}

}  // namespace

at::Tensor lm_head_argmax_cpu(const at::Tensor& hidden, const at::Tensor& weight) {
  check_lm_head_argmax(hidden, weight);
  const at::Tensor h = hidden.contiguous(), w = weight.contiguous();
  at::Tensor out = at::empty({hidden.size(0), hidden.size(1)}, hidden.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(),
                                  "lm_head_argmax_cpu", [&] {
                                    lm_head_argmax_kernel<scalar_t>(h, w, out.data_ptr<int64_t>());
                                  });
  return out;
}

TORCH_LIBRARY_IMPL(cllm_rt, CPU, m) { m.impl("lm_head_argmax", &lm_head_argmax_cpu); }

}  // namespace cllm_rt
