// See layer_glue.h.
#include "layer_glue.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace cllm_rt::cpu {
namespace {

// Tasks of `elements` each per parallel_for grain: ATen's own elementwise grain (TensorIterator's),
// so a one-token step's norms and rotations (a few hundred elements) stay on one thread as its ops do.
int64_t grain_of(int64_t elements) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(elements, 1));
}

// A floating CPU tensor with its data at hand, outside autograd's sight: not a fake or functional
// wrapper (opcheck, torch.compile) and nothing that would need a gradient through these loops.
bool plain(const at::Tensor& t) {
  const c10::DispatchKeySet keys = t.key_set();
  return t.device().is_cpu() && t.has_storage() && !keys.has(c10::DispatchKey::Python) &&
         !keys.has(c10::DispatchKey::Functionalize) && !(at::GradMode::is_enabled() && t.requires_grad());
}

bool floating(const at::Tensor& t) { return at::isFloatingType(t.scalar_type()) && plain(t); }

// The ops below are built with -ffp-contract=fast, which lets the compiler fuse a product into the
// add after it; the references round the product first. Values that pass through memory the
// compiler must assume was changed are rounded ones.
inline void rounded_in_memory() { asm volatile("" ::: "memory"); }

}  // namespace

bool rms_norm_serves(const at::Tensor& x, const at::Tensor& weight) {
  return floating(x) && x.dim() >= 1 && x.is_contiguous() && weight.scalar_type() == x.scalar_type() &&
         plain(weight) && weight.dim() == 1 && weight.size(0) == x.size(-1) && weight.is_contiguous();
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t d = x.size(-1), rows = d == 0 ? 0 : x.numel() / d;
  at::Tensor squares = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    float* sq = squares.data_ptr<float>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t grain = grain_of(d);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin * d; i < end * d; ++i) {  // x.to(float32).pow(2): pow 2 is h * h
        const float h = static_cast<float>(xs[i]);
        sq[i] = h * h;
      }
    });
    // mean(-1) is sum(-1) then div_(d) on the CPU; the sum stays torch's, for its summation order
    const at::Tensor sums = at::sum(squares, {-1});
    const float* s = sums.const_data_ptr<float>();
    const float eps_f = static_cast<float>(eps);  // a Python float added to a float32 tensor
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const float r = 1.f / std::sqrt(s[row] / static_cast<float>(d) + eps_f);  // rsqrt: 1 / sqrt
        const scalar_t* xr = xs + row * d;
        scalar_t* orow = o + row * d;
        for (int64_t j = 0; j < d; ++j) {
          const scalar_t h = static_cast<scalar_t>(static_cast<float>(xr[j]) * r);  // .to(x.dtype)
          orow[j] = static_cast<scalar_t>(static_cast<opmath_t>(w[j]) * static_cast<opmath_t>(h));
        }
      }
    });
  });
  return out;
}

bool rotate_serves(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin) {
  const auto dtype = x.scalar_type();
  return floating(x) && x.dim() == 4 && cos.dim() == 4 && signed_sin.dim() == 4 && cos.scalar_type() == dtype &&
         signed_sin.scalar_type() == dtype && plain(cos) && plain(signed_sin) &&
         x.stride(3) == 1 && cos.stride(3) == 1 && signed_sin.stride(3) == 1 && cos.size(1) == 1 &&
         signed_sin.size(1) == 1 && cos.size(0) == x.size(0) && cos.size(2) == x.size(2) &&
         cos.size(3) == x.size(3) && signed_sin.sizes().equals(cos.sizes());
}

void rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin, const at::Tensor& out) {
  TORCH_CHECK(out.sizes().equals(x.sizes()) && out.scalar_type() == x.scalar_type() && out.stride(3) == 1,
              "rotate: out must be x's shape and dtype with a contiguous last dimension");
  const int64_t B = x.size(0), H = x.size(1), n = x.size(2), D = x.size(3), shift = D / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotate", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    const scalar_t* cs = cos.const_data_ptr<scalar_t>();
    const scalar_t* ss = signed_sin.const_data_ptr<scalar_t>();
    scalar_t* os = out.data_ptr<scalar_t>();
    const int64_t grain = grain_of(D);
    at::parallel_for(0, B * H * n, grain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> by_cos(D), by_sin(D);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / (H * n), h = task / n % H, t = task % n;
        const scalar_t* xr = xs + b * x.stride(0) + h * x.stride(1) + t * x.stride(2);
        const scalar_t* c = cs + b * cos.stride(0) + t * cos.stride(2);
        const scalar_t* s = ss + b * signed_sin.stride(0) + t * signed_sin.stride(2);
        scalar_t* o = os + b * out.stride(0) + h * out.stride(1) + t * out.stride(2);
        for (int64_t j = 0; j < D; ++j) {  // x * cos, rounded to x's dtype
          by_cos[j] = static_cast<scalar_t>(static_cast<opmath_t>(xr[j]) * static_cast<opmath_t>(c[j]));
        }
        for (int64_t j = 0; j < D; ++j) {  // roll(x, shift)[j] = x[(j - shift) mod D], times the signed sin
          const scalar_t rolled = xr[(j - shift + D) % D];
          by_sin[j] = static_cast<scalar_t>(static_cast<opmath_t>(rolled) * static_cast<opmath_t>(s[j]));
        }
        rounded_in_memory();
        for (int64_t j = 0; j < D; ++j) {
          o[j] = static_cast<scalar_t>(static_cast<opmath_t>(by_cos[j]) + static_cast<opmath_t>(by_sin[j]));
        }
      }
    });
  });
}

}  // namespace cllm_rt::cpu
