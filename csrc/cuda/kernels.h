// Host API of the CUDA kernels: raw device pointers and a stream in, cudaError_t out.
//
// Framework-free on purpose (the flashinfer layering): the .cu files that implement
// this compile with plain nvcc, no torch headers, and ops_cuda.cpp is the only
// layer that knows about tensors, dtypes and the current stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace cllm_rt::cuda {

enum class DType { kFloat32, kFloat16, kBFloat16, kFloat64 };

// greedy[b*n + i] = argmax_v logits[b*sb + i*si + v] (torch.argmax ties and NaN);
// accepted[b] = 1 + longest k with block[b, 1..k] == greedy[b, 0..k-1].
// logits rows must have a contiguous last dim; block, greedy, accepted are [B, n] / [B].
cudaError_t jacobi_verify(const void* logits, DType dtype, int64_t B, int64_t n, int64_t V,
                          int64_t sb, int64_t si, const int64_t* block, int64_t* greedy,
                          int64_t* accepted, cudaStream_t stream);

// Split-KV ("flash-decoding") attention of q [B, Hq, n, D] (strides qs[4]) against
// contiguous k/v caches [B, Hkv, S_max, D], query i of row b seeing keys
// 0 .. cache_lens[b] + i, out [B, Hq, n, D] contiguous. cache_lens (int32 or int64,
// lens_is_int64) is clamped to [0, S_max - n] on the device, never read by the host.
// The workspace holds each split's partial output and softmax statistics.
struct BlockAttentionShape {
  int64_t B, Hq, Hkv, n, D, S_max;
  int64_t qs[4];
};
int block_attention_num_splits(const BlockAttentionShape& shape, int device);
size_t block_attention_workspace_bytes(const BlockAttentionShape& shape, int num_splits);
cudaError_t block_attention(const void* q, const void* k_cache, const void* v_cache,
                            const void* cache_lens, bool lens_is_int64, DType dtype,
                            const BlockAttentionShape& shape, double scale, int num_splits,
                            void* workspace, void* out, cudaStream_t stream);

// out[r] = argmax_v sum_k hidden[r*d + k] * weight[v*d + k] for r < R, accumulated in
// float32 (float64 for kFloat64); both operands contiguous.
size_t lm_head_argmax_workspace_bytes(int64_t R, int64_t V);
cudaError_t lm_head_argmax(const void* hidden, const void* weight, DType dtype, int64_t R,
                           int64_t d, int64_t V, void* workspace, int64_t* out,
                           cudaStream_t stream);

}  // namespace cllm_rt::cuda
