// decoder_layers: the llama family's decoder layers for one decoding step, the loop body of
// cllm_rt/runtime/compact.py (its Python reference) written in C++.
//
// Why: a one-token SmolLM2 step spent ~6 ms of ~27 in the Python interpreter between its ops
// (30 layers x ~35 small ops; AMD EPYC Zen 4, 2 threads: the ops' own time summed to ~21 ms). The
// same ATen ops and cllm_rt kernels called from here cost a dispatch each and no interpreter.
//
// Bits: every op is the one the Python loop calls, with the same arguments in the same order (the
// families' RMSNorm in float32, the rotary as compact._rotate, SiLU, the residual adds, the cache
// write, attention and linears through the dispatcher), so the hidden states equal the Python
// loop's bit for bit, in every dtype, on any device whose kernels are registered. Registered for
// CompositeImplicitAutograd: it is glue, not a kernel, so it runs wherever the ops it calls run.
// On the CPU its RMSNorms and q/k rotations are one loop each (cpu/layer_glue.h: ~1.1-1.3 ms of a
// ~23-28 ms one-token step at 1 and 2 threads, Zen 4), with those ops' roundings in their order.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/TensorIndexing.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "cpu/layer_glue.h"

namespace cllm_rt {
namespace {

// One layer's slots in the flat `params` list (cllm_rt/runtime/compact.py builds it): the four
// norms' weights (q_norm, k_norm: qwen3's per-head norms, else none), then per linear in
// kLinearOrder its weight, bias (or none) and int8 scales (none for float weights).
enum Slot : int64_t { kInNorm, kPostNorm, kQNorm, kKNorm, kFirstLinear };
enum Linear : int64_t { kQ, kK, kV, kO, kGate, kUp, kDown, kLinears };
constexpr int64_t kSlotsPerLayer = kFirstLinear + 3 * kLinears;

// The families' RMSNorm: compact._rms_norm's ops (float32 statistics whatever the dtype), as one
// loop around torch's sum where cpu/layer_glue.h serves.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (cpu::rms_norm_serves(x, weight)) return cpu::rms_norm(x, weight, eps);
  at::Tensor h = x.to(at::kFloat);
  h = h * at::rsqrt(h.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return weight * h.to(x.scalar_type());
}

// compact._rotate: x * cos + rotate_half(x) * sin, as a roll and a signed sin; into `out` (a view of
// the cache, or none: a new tensor) where cpu/layer_glue.h serves.
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin,
                  const std::optional<at::Tensor>& out = std::nullopt) {
  if (!cpu::rotate_serves(x, cos, signed_sin)) {
    at::Tensor rotated = x * cos + x.roll({x.size(-1) / 2}, {-1}) * signed_sin;
    return out.has_value() ? out->copy_(rotated) : rotated;
  }
  // a new one is laid out as [B, n, H, D], x's own layout, as ATen's elementwise ops lay it out
  at::Tensor into = out.has_value() ? *out : at::empty({x.size(0), x.size(2), x.size(1), x.size(3)},
                                                        x.options()).transpose(1, 2);
  cpu::rotate(x, cos, signed_sin, into);
  return into;
}

std::vector<at::Tensor> call_linear(const at::Tensor& x, at::TensorList weights,
                                    const c10::List<std::optional<at::Tensor>>& biases) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("cllm_rt::linear", "").typed<
      std::vector<at::Tensor>(const at::Tensor&, at::TensorList, const c10::List<std::optional<at::Tensor>>&)>();
  return op.call(x, weights, biases);
}

std::vector<at::Tensor> call_linear_int8(const at::Tensor& x, at::TensorList weights, at::TensorList scales,
                                         const c10::List<std::optional<at::Tensor>>& biases) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("cllm_rt::linear_int8", "").typed<
      std::vector<at::Tensor>(const at::Tensor&, at::TensorList, at::TensorList,
                              const c10::List<std::optional<at::Tensor>>&)>();
  return op.call(x, weights, scales, biases);
}

at::Tensor call_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                          const at::Tensor& lengths, const std::optional<at::Tensor>& parents, double scale,
                          const std::optional<at::Tensor>& page_table) {
  static const auto block = c10::Dispatcher::singleton().findSchemaOrThrow("cllm_rt::block_attention", "").typed<
      at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                 const std::optional<at::Tensor>&)>();
  static const auto tree = c10::Dispatcher::singleton().findSchemaOrThrow("cllm_rt::tree_attention", "").typed<
      at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                 double, const std::optional<at::Tensor>&)>();
  if (parents.has_value()) return tree.call(q, keys, values, lengths, *parents, scale, page_table);
  return block.call(q, keys, values, lengths, scale, page_table);
}

struct Layer {
  const c10::List<std::optional<at::Tensor>>& params;
  int64_t first;  // the layer's first slot

  std::optional<at::Tensor> get(int64_t slot) const { return params.get(first + slot); }

  // compact._project: the layer's linears `which` applied to x, one cllm_rt::linear_int8 call for
  // int8 weights (scales given), one cllm_rt::linear call where `ours`, else torch's linear each.
  std::vector<at::Tensor> project(const at::Tensor& x, std::initializer_list<Linear> which, bool ours) const {
    std::vector<at::Tensor> weights, scales;
    c10::List<std::optional<at::Tensor>> biases;
    for (Linear linear : which) {
      const int64_t slot = kFirstLinear + 3 * linear;
      weights.push_back(*get(slot));
      biases.push_back(get(slot + 1));
      if (std::optional<at::Tensor> scale = get(slot + 2)) scales.push_back(*scale);
    }
    if (!scales.empty()) return call_linear_int8(x, weights, scales, biases);
    if (ours) return call_linear(x, weights, biases);
    std::vector<at::Tensor> outputs;
    for (size_t i = 0; i < weights.size(); ++i) outputs.push_back(at::linear(x, weights[i], biases.get(i)));
    return outputs;
  }
};

void check_decoder_layers(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& params,
                          at::TensorList keys, at::TensorList values, at::IntArrayRef write_slice,
                          const std::optional<at::Tensor>& write_pages,
                          const std::optional<at::Tensor>& write_offsets, int64_t head_dim) {
  TORCH_CHECK(x.dim() == 3, "decoder_layers: x must be [B, n, d], got ", x.dim(), " dims");
  TORCH_CHECK(head_dim > 0, "decoder_layers: head_dim must be positive, got ", head_dim);
  const int64_t layers = static_cast<int64_t>(keys.size());
  TORCH_CHECK(static_cast<int64_t>(values.size()) == layers && static_cast<int64_t>(params.size()) == layers * kSlotsPerLayer,
              "decoder_layers: ", keys.size(), " key pools, ", values.size(), " value pools and ", params.size(),
              " params; expected one pool each and ", kSlotsPerLayer, " params per layer");
  for (int64_t i = 0; i < layers; ++i) {
    const int64_t first = i * kSlotsPerLayer;
    for (int64_t slot : {kInNorm, kPostNorm}) {
      TORCH_CHECK(params.get(first + slot).has_value(), "decoder_layers: layer ", i, " lacks a norm weight");
    }
    TORCH_CHECK(params.get(first + kQNorm).has_value() == params.get(first + kKNorm).has_value(),
                "decoder_layers: layer ", i, " has a q_norm without a k_norm or the reverse");
    for (int64_t linear = 0; linear < kLinears; ++linear) {
      TORCH_CHECK(params.get(first + kFirstLinear + 3 * linear).has_value(), "decoder_layers: layer ", i,
                  " lacks linear ", linear, "'s weight");
    }
  }
  const bool slice = write_slice.size() == 2;
  TORCH_CHECK(slice != (write_pages.has_value() && write_offsets.has_value()) &&
                  (write_slice.empty() || slice),
              "decoder_layers: give the cache write either as write_slice [page, start] (one row) or as "
              "write_pages and write_offsets [B, n]");
  TORCH_CHECK(!slice || x.size(0) == 1, "decoder_layers: write_slice writes one row, x has ", x.size(0));
}

at::Tensor decoder_layers(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& signed_sin,
                          const c10::List<std::optional<at::Tensor>>& params, at::TensorList keys,
                          at::TensorList values, at::IntArrayRef write_slice,
                          const std::optional<at::Tensor>& write_pages,
                          const std::optional<at::Tensor>& write_offsets, const at::Tensor& lengths,
                          const std::optional<at::Tensor>& page_table, const std::optional<at::Tensor>& parents,
                          int64_t head_dim, double scale, double eps, bool ours) {
  using at::indexing::Slice;
  check_decoder_layers(x_in, params, keys, values, write_slice, write_pages, write_offsets, head_dim);
  const int64_t B = x_in.size(0), n = x_in.size(1);
  at::Tensor x = x_in;
  for (int64_t i = 0; i < static_cast<int64_t>(keys.size()); ++i) {
    const Layer layer{params, i * kSlotsPerLayer};
    at::Tensor h = rms_norm(x, *layer.get(kInNorm), eps);
    std::vector<at::Tensor> qkv = layer.project(h, {kQ, kK, kV}, ours);
    at::Tensor q = qkv[0].view({B, n, -1, head_dim}), k = qkv[1].view({B, n, -1, head_dim});
    const at::Tensor v = qkv[2].view({B, n, -1, head_dim}).transpose(1, 2);
    if (std::optional<at::Tensor> q_norm = layer.get(kQNorm)) {  // qwen3: before the rotation
      q = rms_norm(q, *q_norm, eps);
      k = rms_norm(k, *layer.get(kKNorm), eps);
    }
    q = rotate(q.transpose(1, 2), cos, signed_sin);
    // JacobiCacheLayer.update's write: a slice copy for one row within one page (k rotated straight
    // into it), else index_put
    if (write_slice.size() == 2) {
      const int64_t page = write_slice[0], start = write_slice[1];
      rotate(k.transpose(1, 2), cos, signed_sin, keys[i].select(0, page).slice(1, start, start + n).unsqueeze(0));
      values[i].select(0, page).slice(1, start, start + n).copy_(v.select(0, 0));
    } else {
      k = rotate(k.transpose(1, 2), cos, signed_sin);
      at::Tensor key_pool = keys[i], value_pool = values[i];  // index_put_ takes a non-const handle
      key_pool.index_put_({*write_pages, Slice(), *write_offsets}, k.transpose(1, 2));
      value_pool.index_put_({*write_pages, Slice(), *write_offsets}, v.transpose(1, 2));
    }
    const at::Tensor out = call_attention(q, keys[i], values[i], lengths, parents, scale, page_table);
    x = x + layer.project(out.transpose(1, 2).reshape({B, n, -1}), {kO}, ours)[0];
    h = rms_norm(x, *layer.get(kPostNorm), eps);
    std::vector<at::Tensor> gate_up = layer.project(h, {kGate, kUp}, ours);
    x = x + layer.project(at::silu(gate_up[0]) * gate_up[1], {kDown}, ours)[0];
  }
  return x;
}

}  // namespace

TORCH_LIBRARY_IMPL(cllm_rt, CompositeImplicitAutograd, m) {
  m.impl("decoder_layers", &decoder_layers);
}

}  // namespace cllm_rt
