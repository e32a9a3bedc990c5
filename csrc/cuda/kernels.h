// Host API of the CUDA kernels: raw device pointers and a stream in, cudaError_t out.
//
// Framework-free on purpose (the flashinfer layering): the .cu files that implement
// this compile with plain nvcc, no torch headers, and ops_cuda.cpp is the only
// layer that knows about tensors, dtypes and the current stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "attention_plan.h"

namespace cllm_rt::cuda {

enum class DType { kFloat32, kFloat16, kBFloat16, kFloat64 };

// greedy[b*n + i] = argmax_v logits[b*sb + i*si + v] (torch.argmax ties and NaN);
// accepted[b] = 1 + longest k with block[b, 1..k] == greedy[b, 0..k-1].
// logits rows must have a contiguous last dim; block, greedy, accepted are [B, n] / [B].
cudaError_t jacobi_verify(const void* logits, DType dtype, int64_t B, int64_t n, int64_t V,
                          int64_t sb, int64_t si, const int64_t* block, int64_t* greedy,
                          int64_t* accepted, cudaStream_t stream);

// Split-KV ("flash-decoding") attention of q [B, Hq, n, D] (strides qs[4]) against
// contiguous k/v caches, out [B, Hq, n, D] contiguous. The caches are laid out as pages
// says (common.h): dense [B, Hkv, S_max, D], or pages [num_pages, Hkv, page_size, D]
// with page_size a multiple of kKeyTile; S_max is the positions a row can hold. Query i of
// row b sees cache positions 0 .. cache_lens[b] - 1 and, of the block's positions
// cache_lens[b] + j, those with j <= i (parents == nullptr: block_attention) or j an
// ancestor of i or i itself (parents [B, n], tree_attention). cache_lens (int32 or
// int64, lens_is_int64) and parents must hold checked values (the host does it);
// the kernel clamps lengths, pages and ancestor walks so that no value reads outside
// the caches.
struct AttentionShape {
  int64_t B, Hq, Hkv, n, D, S_max;
  int64_t qs[4];
};

// How one call runs: the shared-memory plan for the device, the key splits and the
// grid. longest = max_b cache_lens[b] + n, the last key any query sees.
struct AttentionLaunch {
  AttentionPlan plan;
  int64_t smem_limit;  // the device's opt-in maximum, or CLLM_RT_CUDA_SMEM_LIMIT if lower
  int num_splits;
  int64_t chunk;       // keys per split, a multiple of kKeyTile
  int64_t row_blocks;  // thread blocks per (b, kv head) along the query rows
};

// Fills launch; returns "" or why the call cannot run on this device (a sentence).
std::string plan_attention_launch(const AttentionShape& shape, DType dtype, bool tree,
                                  int64_t longest, int device, AttentionLaunch* launch);
// Bytes of the splits' partial results: 0 when there is one split (no combine pass).
size_t attention_workspace_bytes(const AttentionShape& shape, DType dtype,
                                 const AttentionLaunch& launch);
cudaError_t attention(const void* q, const void* k_cache, const void* v_cache,
                      const void* cache_lens, bool lens_is_int64, const int64_t* parents,
                      const KvPages& pages, DType dtype, const AttentionShape& shape, double scale,
                      const AttentionLaunch& launch, void* workspace, void* out,
                      cudaStream_t stream);

// Token-tree verification (tree_verify in cllm_rt/ops.py): for each of the B rows of
// int64 [B, n] greedy, tokens, parents (checked values), the deepest confirmed node
// (node), depth + 1 (accepted) and its path from the root, -1 after (path [B, n]).
cudaError_t tree_verify(const int64_t* greedy, const int64_t* tokens, const int64_t* parents,
                        int64_t B, int64_t n, int64_t* accepted, int64_t* node, int64_t* path,
                        cudaStream_t stream);

// out[r] = argmax_v sum_k hidden[r*d + k] * weight[v*d + k] for r < R, accumulated in
// float32 (float64 for kFloat64); both operands contiguous.
size_t lm_head_argmax_workspace_bytes(int64_t R, int64_t V);
cudaError_t lm_head_argmax(const void* hidden, const void* weight, DType dtype, int64_t R,
                           int64_t d, int64_t V, void* workspace, int64_t* out,
                           cudaStream_t stream);

// tokens[b*n + i] = argmax_v logits[...v] / temperature[b] + gumbel_noise(stream of
// (seeds[b], positions[b*n + i]), v) (gumbel_noise.h); temperature 0: the plain argmax.
// seeds [B], positions [B, n], temperature [B] and tokens [B, n] contiguous.
cudaError_t gumbel_argmax(const void* logits, DType dtype, int64_t B, int64_t n, int64_t V,
                          int64_t sb, int64_t si, const int64_t* seeds, const int64_t* positions,
                          const double* temperature, int64_t* tokens, cudaStream_t stream);

// out[r*N + j] = sum_k input[r*K + k] * weight[j*K + k] (+ bias[j]) for r < R, j < N,
// accumulated in float32 (float64 for kFloat64); all contiguous, bias nullptr for none.
cudaError_t linear(const void* input, const void* weight, const void* bias, DType dtype, int64_t R,
                   int64_t K, int64_t N, void* out, cudaStream_t stream);

// out[r*N + j] = (sum_k input[r*K + k] * weight[j*K + k]) * scale[j] (+ bias[j]) with int8 weight and
// input, scale, bias, out of dtype (kFloat32 or kFloat64, also the accumulation type); as linear.
cudaError_t linear_int8(const void* input, const int8_t* weight, const void* scale, const void* bias,
                        DType dtype, int64_t R, int64_t K, int64_t N, void* out, cudaStream_t stream);

}  // namespace cllm_rt::cuda
