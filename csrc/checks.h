// Argument checks shared by the CPU and CUDA entry points of each op. cllm_rt/ops.py
// raises friendlier Python errors before these; they guard direct torch.ops calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace cllm_rt {

constexpr int64_t kMaxHeadDim = 256;

inline void check_jacobi_verify(const at::Tensor& logits, const at::Tensor& block) {
  TORCH_CHECK(logits.dim() == 3 && logits.size(1) > 0 && logits.size(2) > 0 &&
                  logits.stride(2) == 1,
              "jacobi_verify: logits must be [B, n >= 1, V >= 1] with a contiguous last dim");
  TORCH_CHECK(logits.size(2) < INT32_MAX, "jacobi_verify: vocabulary too large");
  TORCH_CHECK(block.dim() == 2 && block.size(0) == logits.size(0) &&
                  block.size(1) == logits.size(1) && block.scalar_type() == at::kLong,
              "jacobi_verify: block must be int64 [B, n]");
  TORCH_CHECK(block.device() == logits.device(), "jacobi_verify: block must be on logits' device");
}

inline void check_block_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& cache_lens) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "block_attention: q must be [B, Hq, n, D], k_cache/v_cache [B, Hkv, S_max, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(),
              "block_attention: k_cache and v_cache must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "block_attention: q, k_cache and v_cache must share a dtype");
  const int64_t Hkv = k_cache.size(1);
  TORCH_CHECK(k_cache.size(0) == q.size(0) && k_cache.size(3) == q.size(3) && Hkv > 0 &&
                  q.size(1) % Hkv == 0,
              "block_attention: k_cache must be [B, Hkv, S_max, D] with Hq % Hkv == 0");
  TORCH_CHECK(q.size(2) > 0 && q.size(3) > 0 && q.size(3) <= kMaxHeadDim,
              "block_attention: need n >= 1 and 1 <= D <= 256");
  TORCH_CHECK(k_cache.size(2) >= q.size(2), "block_attention: need S_max >= n");
  TORCH_CHECK(cache_lens.dim() == 1 && cache_lens.size(0) == q.size(0) &&
                  (cache_lens.scalar_type() == at::kInt || cache_lens.scalar_type() == at::kLong),
              "block_attention: cache_lens must be int32/int64 [B]");
  TORCH_CHECK(k_cache.device() == q.device() && v_cache.device() == q.device() &&
                  cache_lens.device() == q.device(),
              "block_attention: all tensors must be on q's device");
}

inline void check_lm_head_argmax(const at::Tensor& hidden, const at::Tensor& weight) {
  TORCH_CHECK(hidden.dim() == 3 && weight.dim() == 2 && weight.size(1) == hidden.size(2) &&
                  weight.size(0) > 0,
              "lm_head_argmax: hidden must be [B, n, d] and weight [V >= 1, d]");
  TORCH_CHECK(weight.size(0) < INT32_MAX, "lm_head_argmax: vocabulary too large");
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(),
              "lm_head_argmax: hidden and weight must share a dtype");
  TORCH_CHECK(weight.device() == hidden.device(),
              "lm_head_argmax: weight must be on hidden's device");
}

}  // namespace cllm_rt
