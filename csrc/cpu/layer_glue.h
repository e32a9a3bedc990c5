// The decoder layer's small elementwise steps on the CPU, one loop each, for decoder_layers.cpp.
//
// Why: between its linears and attention, a one-token SmolLM2 step made ~20 ATen calls a layer for
// two RMSNorms and the rotation of q and k (each RMSNorm a pow, a sum, a div, an add, an rsqrt, two
// muls; each rotation two muls, a roll made of two narrows and a cat, an add; k then a select, a
// slice and a copy into the cache). Each call costs ~1-3 us of dispatch and TensorIterator set-up
// for ~1 us of arithmetic (AMD EPYC Zen 4, 1 thread: ~4.5 of ~27 ms a step).
//
// Bits: each loop does the roundings of the ops it replaces, in their order (compact._rms_norm and
// compact._rotate are the references; tests/test_compact.py compares the hidden states and caches
// bit for bit). The RMSNorm's one reduction still runs as at::sum over the same [.., d] float
// squares, so its summation order stays torch's (which depends on the vector width).
#pragma once

#include <ATen/core/Tensor.h>

namespace cllm_rt::cpu {

// Whether rms_norm below serves x and weight: CPU, x contiguous, weight [d] contiguous, both one
// floating dtype.
bool rms_norm_serves(const at::Tensor& x, const at::Tensor& weight);

// The llama family's RMSNorm, weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// Whether rotate below serves x [B, H, n, D], the tables [B, 1, n, D] and out: CPU, one floating
// dtype, every last dimension contiguous.
bool rotate_serves(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin);

// out = x * cos + roll(x, D / 2, -1) * signed_sin (compact._rotate) into out [B, H, n, D], which
// may be a view, e.g. of the KV cache's pool.
void rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin, const at::Tensor& out);

}  // namespace cllm_rt::cpu
