// CUDA entry points of the cllm_rt ops: argument checks, output and workspace
// allocation, dtype mapping, device guard and current stream around the
// framework-free launchers of kernels.h.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../checks.h"
#include "kernels.h"

namespace cllm_rt {
namespace {

cuda::DType kernel_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "cllm_rt: unsupported dtype ", type);
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

void check_cuda(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": expected CUDA tensors");
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> jacobi_verify_cuda(const at::Tensor& logits,
                                                      const at::Tensor& block_in) {
  check_jacobi_verify(logits, block_in);
  check_cuda(logits, "jacobi_verify");
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor block = block_in.contiguous();
  const int64_t B = logits.size(0), n = logits.size(1);
  at::Tensor greedy = at::empty({B, n}, block.options());
  at::Tensor accepted = at::empty({B}, block.options());
  check_launch(cuda::jacobi_verify(logits.const_data_ptr(), kernel_dtype(logits.scalar_type()), B,
                                   n, logits.size(2), logits.stride(0), logits.stride(1),
                                   block.const_data_ptr<int64_t>(), greedy.data_ptr<int64_t>(),
                                   accepted.data_ptr<int64_t>(),
                                   c10::cuda::getCurrentCUDAStream()),
               "jacobi_verify");
  return {greedy, accepted};
}

// Both attention ops: ancestors come from parents (undefined: causal); S_max as
// check_attention returns it.
at::Tensor attention_cuda(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, const at::Tensor& cache_lens_in,
                          const at::Tensor& parents, const std::optional<at::Tensor>& page_table,
                          int64_t S_max, double scale) {
  check_cuda(q, op);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t longest = check_cache_lens_values(op, cache_lens_in, q.size(2), S_max) + q.size(2);
  const at::Tensor cache_lens = cache_lens_in.contiguous();
  at::Tensor table;
  KvPages pages{nullptr, 1, S_max, q.size(0)};
  if (page_table.has_value()) {
    check_page_table_values(op, *page_table, k_cache.size(0));
    table = page_table->contiguous();
    pages = {table.const_data_ptr<int64_t>(), table.size(1), k_cache.size(2), k_cache.size(0)};
  }
  const cuda::AttentionShape shape{q.size(0), q.size(1), k_cache.size(1), q.size(2), q.size(3),
                                   S_max, {q.stride(0), q.stride(1), q.stride(2), q.stride(3)}};
  const cuda::DType dtype = kernel_dtype(q.scalar_type());
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous [B, Hq, n, D]
  if (shape.B == 0) return out;
  cuda::AttentionLaunch launch{};
  const std::string refused = cuda::plan_attention_launch(shape, dtype, parents.defined(), longest,
                                                          q.get_device(), &launch);
  TORCH_CHECK_VALUE(refused.empty(), op, ": ", refused);
  const at::Tensor space = workspace(cuda::attention_workspace_bytes(shape, dtype, launch), q);
  check_launch(cuda::attention(q.const_data_ptr(), k_cache.const_data_ptr(), v_cache.const_data_ptr(),
                               cache_lens.const_data_ptr(), cache_lens.scalar_type() == at::kLong,
                               parents.defined() ? parents.const_data_ptr<int64_t>() : nullptr,
                               pages, dtype, shape, scale, launch, space.data_ptr(), out.data_ptr(),
                               c10::cuda::getCurrentCUDAStream()),
               op);
  return out;
}

at::Tensor block_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& cache_lens,
                                double scale, const std::optional<at::Tensor>& page_table) {
  const int64_t S_max = check_attention("block_attention", q, k_cache, v_cache, cache_lens, page_table);
  return attention_cuda("block_attention", q, k_cache, v_cache, cache_lens, at::Tensor(), page_table,
                        S_max, scale);
}

at::Tensor tree_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& cache_lens,
                               const at::Tensor& parents, double scale,
                               const std::optional<at::Tensor>& page_table) {
  const int64_t S_max = check_tree_attention(q, k_cache, v_cache, cache_lens, parents, page_table);
  check_parents_values("tree_attention", parents);
  return attention_cuda("tree_attention", q, k_cache, v_cache, cache_lens, parents.contiguous(),
                        page_table, S_max, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_verify_cuda(const at::Tensor& greedy,
                                                               const at::Tensor& tokens,
                                                               const at::Tensor& parents) {
  const TreeVerifyArgs args = prepare_tree_verify(greedy, tokens, parents);
  check_cuda(greedy, "tree_verify");
  const c10::cuda::CUDAGuard guard(greedy.device());
  check_launch(cuda::tree_verify(args.greedy.const_data_ptr<int64_t>(),
                                 args.tokens.const_data_ptr<int64_t>(),
                                 args.parents.const_data_ptr<int64_t>(), greedy.size(0),
                                 greedy.size(1), args.accepted.data_ptr<int64_t>(),
                                 args.node.data_ptr<int64_t>(), args.path.data_ptr<int64_t>(),
                                 c10::cuda::getCurrentCUDAStream()),
               "tree_verify");
  return {args.accepted, args.node, args.path};
}

at::Tensor lm_head_argmax_cuda(const at::Tensor& hidden_in, const at::Tensor& weight_in) {
  check_lm_head_argmax(hidden_in, weight_in);
  check_cuda(hidden_in, "lm_head_argmax");
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const at::Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous();
  const int64_t R = hidden.size(0) * hidden.size(1), V = weight.size(0);
  const at::Tensor space = workspace(cuda::lm_head_argmax_workspace_bytes(R, V), hidden);
  at::Tensor out = at::empty({hidden.size(0), hidden.size(1)}, hidden.options().dtype(at::kLong));
  check_launch(cuda::lm_head_argmax(hidden.const_data_ptr(), weight.const_data_ptr(),
                                    kernel_dtype(hidden.scalar_type()), R, hidden.size(2), V,
                                    space.data_ptr(), out.data_ptr<int64_t>(),
                                    c10::cuda::getCurrentCUDAStream()),
               "lm_head_argmax");
  return out;
}

at::Tensor gumbel_argmax_cuda(const at::Tensor& logits, const at::Tensor& seeds_in,
                              const at::Tensor& positions_in, const at::Tensor& temperature_in) {
  check_gumbel_argmax(logits, seeds_in, positions_in, temperature_in);
  check_cuda(logits, "gumbel_argmax");
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor seeds = seeds_in.contiguous(), positions = positions_in.contiguous(),
                   temperature = temperature_in.contiguous();
  const int64_t B = logits.size(0), n = logits.size(1);
  at::Tensor tokens = at::empty({B, n}, positions.options());
  check_launch(cuda::gumbel_argmax(logits.const_data_ptr(), kernel_dtype(logits.scalar_type()), B,
                                   n, logits.size(2), logits.stride(0), logits.stride(1),
                                   seeds.const_data_ptr<int64_t>(),
                                   positions.const_data_ptr<int64_t>(),
                                   temperature.const_data_ptr<double>(), tokens.data_ptr<int64_t>(),
                                   c10::cuda::getCurrentCUDAStream()),
               "gumbel_argmax");
  return tokens;
}

// The glue both linear ops share: for each weight, its contiguous copy, its bias (or an undefined
// tensor) and a new output [..., N_i], handed to launch(i, weight, bias, out, R, K).
template <typename Launch>
std::vector<at::Tensor> each_linear(const at::Tensor& input, at::TensorList weights,
                                    const c10::List<std::optional<at::Tensor>>& biases,
                                    const Launch& launch) {
  const int64_t K = input.size(-1), R = input.numel() / K;  // K >= 1: checked
  std::vector<at::Tensor> outputs;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor weight = weights[i].contiguous();
    const std::optional<at::Tensor> bias_in = biases.get(i);
    const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
    std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end() - 1);
    shape.push_back(weight.size(0));
    at::Tensor out = at::empty(shape, input.options());
    launch(i, weight, bias, out, R, K);
    outputs.push_back(out);
  }
  return outputs;
}

std::vector<at::Tensor> linear_cuda(const at::Tensor& input_in, at::TensorList weights,
                                    const c10::List<std::optional<at::Tensor>>& biases) {
  check_linear(input_in, weights, biases);
  check_cuda(input_in, "linear");
  const c10::cuda::CUDAGuard guard(input_in.device());
  const at::Tensor input = input_in.contiguous();
  return each_linear(input, weights, biases, [&](size_t, const at::Tensor& weight, const at::Tensor& bias,
                                                 at::Tensor& out, int64_t R, int64_t K) {
    check_launch(cuda::linear(input.const_data_ptr(), weight.const_data_ptr(),
                              bias.defined() ? bias.const_data_ptr() : nullptr,
                              kernel_dtype(input.scalar_type()), R, K, weight.size(0), out.data_ptr(),
                              c10::cuda::getCurrentCUDAStream()),
                 "linear");
  });
}

std::vector<at::Tensor> linear_int8_cuda(const at::Tensor& input_in, at::TensorList weights,
                                         at::TensorList scales,
                                         const c10::List<std::optional<at::Tensor>>& biases) {
  check_linear_int8(input_in, weights, scales, biases);
  check_cuda(input_in, "linear_int8");
  const c10::cuda::CUDAGuard guard(input_in.device());
  const at::Tensor input = input_in.contiguous();
  return each_linear(input, weights, biases, [&](size_t i, const at::Tensor& weight, const at::Tensor& bias,
                                                 at::Tensor& out, int64_t R, int64_t K) {
    const at::Tensor scale = scales[i].contiguous();
    check_launch(cuda::linear_int8(input.const_data_ptr(), weight.const_data_ptr<int8_t>(),
                                   scale.const_data_ptr(), bias.defined() ? bias.const_data_ptr() : nullptr,
                                   kernel_dtype(input.scalar_type()), R, K, weight.size(0), out.data_ptr(),
                                   c10::cuda::getCurrentCUDAStream()),
                 "linear_int8");
  });
}

TORCH_LIBRARY_IMPL(cllm_rt, CUDA, m) {
  m.impl("jacobi_verify", &jacobi_verify_cuda);
  m.impl("block_attention", &block_attention_cuda);
  m.impl("tree_attention", &tree_attention_cuda);
  m.impl("tree_verify", &tree_verify_cuda);
  m.impl("lm_head_argmax", &lm_head_argmax_cuda);
  m.impl("gumbel_argmax", &gumbel_argmax_cuda);
  m.impl("linear", &linear_cuda);
  m.impl("linear_int8", &linear_int8_cuda);
}

}  // namespace cllm_rt
