// jacobi_verify on CPU: greedy tokens of a Jacobi block and its accepted length.
//
// One pass over the logits: every (b, i) row's argmax runs in parallel with the
// vectorized first-index/NaN-aware reduction of argmax.h; the accepted-prefix scan
// over the [B, n] greedy tokens is then a trivial serial loop.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "argmax.h"

namespace cllm_rt {

std::tuple<at::Tensor, at::Tensor> jacobi_verify_cpu(const at::Tensor& logits,
                                                     const at::Tensor& block) {
  check_jacobi_verify(logits, block);
  const int64_t B = logits.size(0), n = logits.size(1), V = logits.size(2);
  at::Tensor greedy = at::empty({B, n}, block.options());
  at::Tensor accepted = at::empty({B}, block.options());
  int64_t* g = greedy.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "jacobi_verify_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* x = logits.const_data_ptr<scalar_t>();
        const int64_t sb = logits.stride(0), si = logits.stride(1);
        // Rows per thread: at least ~64K logits each, below which waking a thread
        // costs more than it saves.
        const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / V);
        at::parallel_for(0, B * n, grain, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            g[r] = row_argmax<scalar_t, acc_t>(x + (r / n) * sb + (r % n) * si, V).index;
          }
        });
      });

  const at::Tensor blk = block.contiguous();
  const int64_t* d = blk.const_data_ptr<int64_t>();
  int64_t* a = accepted.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    // block[b, k+1] is accepted while it equals the greedy token predicted at k.
    int64_t k = 0;
    while (k + 1 < n && d[b * n + k + 1] == g[b * n + k]) ++k;
    a[b] = k + 1;
  }
  return {greedy, accepted};
}

TORCH_LIBRARY_IMPL(cllm_rt, CPU, m) { m.impl("jacobi_verify", &jacobi_verify_cpu); }

}  // namespace cllm_rt
