// CUDA entry points of the cllm_rt ops: argument checks, output and workspace
// allocation, dtype mapping, device guard and current stream around the
// framework-free launchers of kernels.h.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

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

at::Tensor block_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& cache_lens_in,
                                double scale) {
  check_block_attention(q, k_cache, v_cache, cache_lens_in);
  check_cuda(q, "block_attention");
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor cache_lens = cache_lens_in.contiguous();
  cuda::BlockAttentionShape shape{q.size(0), q.size(1), k_cache.size(1), q.size(2), q.size(3),
                                  k_cache.size(2), {q.stride(0), q.stride(1), q.stride(2),
                                                    q.stride(3)}};
  const int splits = cuda::block_attention_num_splits(shape, q.get_device());
  const at::Tensor space = workspace(cuda::block_attention_workspace_bytes(shape, splits), q);
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous [B, Hq, n, D]
  check_launch(cuda::block_attention(q.const_data_ptr(), k_cache.const_data_ptr(),
                                     v_cache.const_data_ptr(), cache_lens.const_data_ptr(),
                                     cache_lens.scalar_type() == at::kLong,
                                     kernel_dtype(q.scalar_type()), shape, scale, splits,
                                     space.data_ptr(), out.data_ptr(),
                                     c10::cuda::getCurrentCUDAStream()),
               "block_attention");
  return out;
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

TORCH_LIBRARY_IMPL(cllm_rt, CUDA, m) {
  m.impl("jacobi_verify", &jacobi_verify_cuda);
  m.impl("block_attention", &block_attention_cuda);
  m.impl("lm_head_argmax", &lm_head_argmax_cuda);
}

}  // namespace cllm_rt
