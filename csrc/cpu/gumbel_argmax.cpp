// gumbel_argmax on CPU: sampled tokens argmax(logits / T + Gumbel noise) per row.
//
// A row with temperature 0 is the greedy row_argmax of jacobi_verify, bit for bit.
// A sampled row is one pass in float64 whatever the logits' dtype: the noise of each
// token is drawn where it is used (gumbel_noise.h), never stored, and masked tokens
// (-inf, from top-k/top-p/min-p) skip the draw. Rows run in parallel.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../checks.h"
#include "../gumbel_noise.h"
#include "argmax.h"

namespace cllm_rt {
namespace {

template <typename scalar_t>
int64_t sampled_row(const scalar_t* x, int64_t V, uint64_t stream, double temperature) {
  RunningArgMax<double> best;
  for (int64_t v = 0; v < V; ++v) {
    const double z = static_cast<double>(x[v]);
    const bool masked = z == -std::numeric_limits<double>::infinity();
    best.push(masked ? z : z / temperature + gumbel_noise(stream, static_cast<uint64_t>(v)), v);
  }
  return best.result().index;
}

}  // namespace

at::Tensor gumbel_argmax_cpu(const at::Tensor& logits, const at::Tensor& seeds,
                             const at::Tensor& positions, const at::Tensor& temperature) {
  check_gumbel_argmax(logits, seeds, positions, temperature);
  const int64_t B = logits.size(0), n = logits.size(1), V = logits.size(2);
  at::Tensor tokens = at::empty({B, n}, positions.options());
  int64_t* out = tokens.data_ptr<int64_t>();
  const at::Tensor seed = seeds.contiguous(), pos = positions.contiguous(),
                   temp = temperature.contiguous();
  const int64_t* s = seed.const_data_ptr<int64_t>();
  const int64_t* p = pos.const_data_ptr<int64_t>();
  const double* t = temp.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "gumbel_argmax_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* x = logits.const_data_ptr<scalar_t>();
        const int64_t sb = logits.stride(0), si = logits.stride(1);
        const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / V);
        at::parallel_for(0, B * n, grain, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const int64_t b = r / n;
            const scalar_t* row = x + b * sb + (r % n) * si;
            out[r] = t[b] == 0.0 ? row_argmax<scalar_t, acc_t>(row, V).index
                                 : sampled_row(row, V,
                                               gumbel_stream(static_cast<uint64_t>(s[b]),
                                                             static_cast<uint64_t>(p[r])),
                                               t[b]);
          }
        });
      });
  return tokens;
}

// The uniforms behind the noise, [B, n, vocab] float64: for tests that hold the
// torch reference to the kernel's generator bit for bit.
at::Tensor gumbel_uniform_cpu(const at::Tensor& seeds, const at::Tensor& positions, int64_t vocab) {
  check_gumbel_streams("gumbel_uniform", seeds, positions);
  const int64_t B = positions.size(0), n = positions.size(1);
  at::Tensor u = at::empty({B, n, vocab}, positions.options().dtype(at::kDouble));
  const at::Tensor seed = seeds.contiguous(), pos = positions.contiguous();
  const int64_t* s = seed.const_data_ptr<int64_t>();
  const int64_t* p = pos.const_data_ptr<int64_t>();
  double* out = u.data_ptr<double>();
  for (int64_t r = 0; r < B * n; ++r) {
    const uint64_t stream = gumbel_stream(static_cast<uint64_t>(s[r / n]), static_cast<uint64_t>(p[r]));
    for (int64_t v = 0; v < vocab; ++v) out[r * vocab + v] = gumbel_uniform(stream, static_cast<uint64_t>(v));
  }
  return u;
}

TORCH_LIBRARY_IMPL(cllm_rt, CPU, m) {
  m.impl("gumbel_argmax", &gumbel_argmax_cpu);
  m.impl("gumbel_uniform", &gumbel_uniform_cpu);
}

}  // namespace cllm_rt
