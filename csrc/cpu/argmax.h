// Row argmax with torch.argmax semantics, in one vectorized pass.
//
// torch.argmax returns the first index of the maximum; NaN counts as larger than
// everything, so a row holding NaN returns its first NaN; -0.0 == 0.0 ties.
// Here kLanes independent (max, index) accumulators advance with strict '>' so each
// lane keeps its first maximum; the lanes are merged at the end preferring the
// smallest index among equal values. NaN is only flagged in the hot loop (a NaN
// never wins '>'), and a row that has one is rescanned for its first NaN.
#pragma once

#include "../common.h"  // ArgMax, merge_argmax: the rules the CUDA kernels use too
#include "simd.h"

namespace cllm_rt {

// Argmax of x[0..len) (elements widened to acc_t), indices reported + `offset`.
template <typename scalar_t, typename acc_t>
ArgMax<acc_t> row_argmax(const scalar_t* x, int64_t len, int64_t offset = 0) {
  // kUnroll independent chains of native-width vectors (wider GCC vectors than the
  // hardware's get scalarized around the selects).
  constexpr int kW = 32 / sizeof(acc_t), kUnroll = 4, kStep = kW * kUnroll;
  using VA = simd::Vec<acc_t>;
  using VI = simd::Vec<simd::MaskInt<acc_t>>;

  ArgMax<acc_t> best{acc_t(0), -1, false};
  int64_t j = 0;
  if (len >= kStep) {
    VA maxv[kUnroll];
    VI maxi[kUnroll], index[kUnroll], nan[kUnroll];
    for (int u = 0; u < kUnroll; ++u) {
      for (int l = 0; l < kW; ++l) index[u][l] = u * kW + l;
      maxv[u] = simd::load_widened<scalar_t, acc_t, kW>(x + u * kW);
      maxi[u] = index[u];
      nan[u] = maxv[u] != maxv[u];
    }
    for (j = kStep; j + kStep <= len; j += kStep) {
      for (int u = 0; u < kUnroll; ++u) {
        index[u] += kStep;
        const VA v = simd::load_widened<scalar_t, acc_t, kW>(x + j + u * kW);
        const VI greater = v > maxv[u];
        maxv[u] = greater ? v : maxv[u];
        maxi[u] = greater ? index[u] : maxi[u];
        nan[u] |= v != v;
      }
    }
    bool any_nan = false;
    for (int u = 0; u < kUnroll; ++u) {
      for (int l = 0; l < kW; ++l) {
        any_nan |= nan[u][l] != 0;
        best = merge_argmax(best, {maxv[u][l], maxi[u][l], false});
      }
    }
    if (any_nan) {
      for (int64_t t = 0;; ++t) {
        const acc_t v = static_cast<acc_t>(x[t]);
        if (v != v) return {v, t + offset, true};
      }
    }
  }
  for (; j < len; ++j) {  // tail: indices above every lane's
    best = merge_argmax(best, {static_cast<acc_t>(x[j]), j, x[j] != x[j]});
    if (best.nan) break;
  }
  if (best.index >= 0) best.index += offset;
  return best;
}

}  // namespace cllm_rt
