// Argument checks shared by the CPU and CUDA entry points of each op: the authoritative
// definition of what each op accepts. cllm_rt/ops.py tests the same conditions first so
// that its messages name the Python argument (tests/test_ops.py holds the two together
// case by case); these guard direct torch.ops calls. TORCH_CHECK_VALUE / _TYPE raise
// ValueError / TypeError in Python, as ops.py does.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "common.h"

namespace cllm_rt {

inline bool is_kernel_float(at::ScalarType type) {
  return type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16;
}

inline void check_float(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK_TYPE(is_kernel_float(x.scalar_type()), op, ": ", name,
                   " must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& x,
                              const at::Tensor& ref) {
  TORCH_CHECK_VALUE(x.device() == ref.device(), op, ": ", name, " must be on the device of the ",
                    "first argument, ", ref.device(), ", got ", x.device());
}

// An int64 [B, n] tensor of token ids or node indices on like's device.
inline void check_index_matrix(const char* op, const char* name, const at::Tensor& x, int64_t B,
                               int64_t n, const at::Tensor& like) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == B && x.size(1) == n, op, ": ", name,
                    " must have shape [B, n] = [", B, ", ", n, "], got ", x.sizes());
  check_same_device(op, name, x, like);
}

inline void check_jacobi_verify(const at::Tensor& logits, const at::Tensor& block) {
  check_float("jacobi_verify", "logits", logits);
  TORCH_CHECK_VALUE(logits.dim() == 3 && logits.size(1) > 0 && logits.size(2) > 0,
                    "jacobi_verify: logits must be [B, n >= 1, V >= 1], got ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(2) < INT32_MAX, "jacobi_verify: vocabulary too large");
  TORCH_CHECK_VALUE(logits.stride(2) == 1, "jacobi_verify: logits must have a contiguous last dim");
  check_index_matrix("jacobi_verify", "block", block, logits.size(0), logits.size(1), logits);
}

// gumbel_argmax's seeds [B] and positions [B, n] (int64, on like's device): one noise
// stream per (row, position).
inline void check_gumbel_streams(const char* op, const at::Tensor& seeds, const at::Tensor& positions) {
  TORCH_CHECK_TYPE(seeds.scalar_type() == at::kLong, op, ": seeds must be int64, got ",
                   seeds.scalar_type());
  TORCH_CHECK_VALUE(seeds.dim() == 1, op, ": seeds must be [B], got ", seeds.sizes());
  check_index_matrix(op, "positions", positions, seeds.size(0),
                     positions.dim() == 2 ? positions.size(1) : -1, seeds);
}

inline void check_gumbel_argmax(const at::Tensor& logits, const at::Tensor& seeds,
                                const at::Tensor& positions, const at::Tensor& temperature) {
  check_float("gumbel_argmax", "logits", logits);
  TORCH_CHECK_VALUE(logits.dim() == 3 && logits.size(1) > 0 && logits.size(2) > 0,
                    "gumbel_argmax: logits must be [B, n >= 1, V >= 1], got ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(2) < INT32_MAX, "gumbel_argmax: vocabulary too large");
  TORCH_CHECK_VALUE(logits.stride(2) == 1, "gumbel_argmax: logits must have a contiguous last dim");
  check_same_device("gumbel_argmax", "seeds", seeds, logits);
  check_gumbel_streams("gumbel_argmax", seeds, positions);
  TORCH_CHECK_VALUE(seeds.size(0) == logits.size(0) && positions.size(1) == logits.size(1),
                    "gumbel_argmax: seeds/positions must be [B] / [B, n] for logits ", logits.sizes());
  TORCH_CHECK_TYPE(temperature.scalar_type() == at::kDouble,
                   "gumbel_argmax: temperature must be float64, got ", temperature.scalar_type());
  TORCH_CHECK_VALUE(temperature.dim() == 1 && temperature.size(0) == logits.size(0),
                    "gumbel_argmax: temperature must be [B = ", logits.size(0), "], got ",
                    temperature.sizes());
  check_same_device("gumbel_argmax", "temperature", temperature, logits);
}

// block_attention and tree_attention: q [B, Hq, n, D], cache_lens [B], and k/v caches
// either dense, [B, Hkv, S_max, D], or paged, [num_pages, Hkv, page_size, D] with
// page_table int64 [B, pages_per_row] (row b's position s in page page_table[b, s /
// page_size]; S_max = pages_per_row * page_size). Returns S_max. The values of
// cache_lens and page_table are checked by check_cache_lens_values and
// check_page_table_values.
inline int64_t check_attention(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& cache_lens,
                               const std::optional<at::Tensor>& page_table) {
  check_float(op, "q", q);
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be [B, Hq, n, D], got ", q.sizes());
  const char* layout = page_table.has_value() ? "[num_pages, Hkv, page_size, D]" : "[B, Hkv, S_max, D]";
  for (const auto& [name, x] : {std::pair{"k_cache", &k_cache}, std::pair{"v_cache", &v_cache}}) {
    TORCH_CHECK_TYPE(x->scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ",
                     q.scalar_type(), ", got ", x->scalar_type());
    TORCH_CHECK_VALUE(x->dim() == 4, op, ": ", name, " must be ", layout, ", got ", x->sizes());
    check_same_device(op, name, *x, q);
    TORCH_CHECK_VALUE(x->is_contiguous(), op, ": ", name, " must be contiguous");
  }
  const int64_t B = q.size(0), Hq = q.size(1), n = q.size(2), D = q.size(3);
  TORCH_CHECK_VALUE(k_cache.size(3) == D && (page_table.has_value() || k_cache.size(0) == B), op,
                    ": k_cache must be ", layout, " with q's ", page_table.has_value() ? "D" : "B and D",
                    ", got ", k_cache.sizes());
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have k_cache's shape ",
                    k_cache.sizes(), ", got ", v_cache.sizes());
  const int64_t Hkv = k_cache.size(1);
  TORCH_CHECK_VALUE(Hq > 0 && Hkv > 0 && Hq % Hkv == 0, op, ": q's head count ", Hq,
                    " must be a positive multiple of k_cache's ", Hkv);
  TORCH_CHECK_VALUE(n > 0 && D > 0 && D <= kMaxHeadDim, op, ": q must have n >= 1 and 1 <= D <= ",
                    kMaxHeadDim, ", got ", q.sizes());
  int64_t S_max = k_cache.size(2);
  if (page_table.has_value()) {
    const at::Tensor& table = *page_table;
    TORCH_CHECK_VALUE(k_cache.size(0) > 0 && S_max > 0 && S_max % kPageSizeMultiple == 0, op,
                      ": a paged k_cache needs num_pages >= 1 and a page_size that is a multiple of ",
                      kPageSizeMultiple, ", got ", k_cache.sizes());
    TORCH_CHECK_TYPE(table.scalar_type() == at::kLong, op, ": page_table must be int64, got ",
                     table.scalar_type());
    TORCH_CHECK_VALUE(table.dim() == 2 && table.size(0) == B && table.size(1) > 0, op,
                      ": page_table must be [B = ", B, ", pages_per_row >= 1], got ", table.sizes());
    check_same_device(op, "page_table", table, q);
    S_max *= table.size(1);
  }
  TORCH_CHECK_VALUE(S_max >= n, op, ": the cache's S_max = ", S_max,
                    " must be at least the block length n = ", n);
  TORCH_CHECK_TYPE(cache_lens.scalar_type() == at::kInt || cache_lens.scalar_type() == at::kLong,
                   op, ": cache_lens must be int32 or int64, got ", cache_lens.scalar_type());
  TORCH_CHECK_VALUE(cache_lens.dim() == 1 && cache_lens.size(0) == B, op,
                    ": cache_lens must have shape [B] = [", B, "], got ", cache_lens.sizes());
  check_same_device(op, "cache_lens", cache_lens, q);
  return S_max;
}

inline void check_tree_nodes(const char* op, int64_t n) {
  TORCH_CHECK_VALUE(n >= 1 && n <= kMaxTreeNodes, op, ": a tree must have 1 <= n <= ", kMaxTreeNodes,
                    " nodes, got n = ", n);
}

// tree_attention: check_attention's arguments and parents, int64 [B, n] (its values by
// check_parents_values); returns S_max.
inline int64_t check_tree_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                    const at::Tensor& v_cache, const at::Tensor& cache_lens,
                                    const at::Tensor& parents,
                                    const std::optional<at::Tensor>& page_table) {
  const int64_t S_max = check_attention("tree_attention", q, k_cache, v_cache, cache_lens, page_table);
  check_tree_nodes("tree_attention", q.size(2));
  check_index_matrix("tree_attention", "parents", parents, q.size(0), q.size(2), q);
  return S_max;
}

// tree_verify: greedy, tokens and parents, all int64 [B, n] on one device.
inline void check_tree_verify(const at::Tensor& greedy, const at::Tensor& tokens,
                              const at::Tensor& parents) {
  TORCH_CHECK_TYPE(greedy.scalar_type() == at::kLong, "tree_verify: greedy must be int64, got ",
                   greedy.scalar_type());
  TORCH_CHECK_VALUE(greedy.dim() == 2, "tree_verify: greedy must be [B, n], got ", greedy.sizes());
  check_tree_nodes("tree_verify", greedy.size(1));
  check_index_matrix("tree_verify", "tokens", tokens, greedy.size(0), greedy.size(1), greedy);
  check_index_matrix("tree_verify", "parents", parents, greedy.size(0), greedy.size(1), greedy);
}

inline void check_lm_head_argmax(const at::Tensor& hidden, const at::Tensor& weight) {
  check_float("lm_head_argmax", "hidden", hidden);
  TORCH_CHECK_VALUE(hidden.dim() == 3, "lm_head_argmax: hidden must be [B, n, d], got ",
                    hidden.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(),
                   "lm_head_argmax: weight must have hidden's dtype ", hidden.scalar_type(), ", got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == hidden.size(2) && weight.size(0) > 0,
                    "lm_head_argmax: weight must be [V >= 1, d = ", hidden.size(2), "], got ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) < INT32_MAX, "lm_head_argmax: vocabulary too large");
  check_same_device("lm_head_argmax", "weight", weight, hidden);
}

// linear: input [..., K]; weights [N_i, K] of input's dtype; biases one per weight, each
// None or [N_i] of input's dtype; all on input's device.
inline void check_linear(const at::Tensor& input, at::TensorList weights,
                         const c10::List<std::optional<at::Tensor>>& biases) {
  check_float("linear", "input", input);
  TORCH_CHECK_VALUE(input.dim() >= 1 && input.size(-1) > 0,
                    "linear: input must be [..., K] with K >= 1, got ", input.sizes());
  TORCH_CHECK_VALUE(!weights.empty(), "linear: weights must hold at least one weight");
  TORCH_CHECK_VALUE(biases.size() == weights.size(), "linear: biases must hold one entry (a tensor ",
                    "or None) per weight, got ", biases.size(), " for ", weights.size(), " weights");
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK_TYPE(w.scalar_type() == input.scalar_type(), "linear: weights[", i,
                     "] must have input's dtype ", input.scalar_type(), ", got ", w.scalar_type());
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) == input.size(-1), "linear: weights[", i,
                      "] must be [N, K = ", input.size(-1), "], got ", w.sizes());
    check_same_device("linear", "weights", w, input);
    const std::optional<at::Tensor> bias = biases.get(i);
    if (!bias.has_value()) continue;
    TORCH_CHECK_TYPE(bias->scalar_type() == input.scalar_type(), "linear: biases[", i,
                     "] must have input's dtype ", input.scalar_type(), ", got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == w.size(0), "linear: biases[", i,
                      "] must be [N = ", w.size(0), "], got ", bias->sizes());
    check_same_device("linear", "biases", *bias, input);
  }
}

// linear_int8: input float32/float64 [..., K]; weights int8 [N_i, K]; scales [N_i] and biases (None or
// [N_i]) of input's dtype; all on input's device.
inline void check_linear_int8(const at::Tensor& input, at::TensorList weights, at::TensorList scales,
                              const c10::List<std::optional<at::Tensor>>& biases) {
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
                   "linear_int8: input must be float32 or float64, got ", input.scalar_type());
  TORCH_CHECK_VALUE(input.dim() >= 1 && input.size(-1) > 0,
                    "linear_int8: input must be [..., K] with K >= 1, got ", input.sizes());
  TORCH_CHECK_VALUE(!weights.empty(), "linear_int8: weights must hold at least one weight");
  TORCH_CHECK_VALUE(scales.size() == weights.size() && biases.size() == weights.size(),
                    "linear_int8: scales and biases must hold one entry per weight, got ", scales.size(),
                    " and ", biases.size(), " for ", weights.size(), " weights");
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK_TYPE(w.scalar_type() == at::kChar, "linear_int8: weights[", i, "] must be int8, got ",
                     w.scalar_type());
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) == input.size(-1), "linear_int8: weights[", i,
                      "] must be [N, K = ", input.size(-1), "], got ", w.sizes());
    check_same_device("linear_int8", "weights", w, input);
    std::optional<at::Tensor> bias = biases.get(i);
    for (const auto& [name, x] : {std::pair{"scales", std::optional<at::Tensor>(scales[i])},
                                  std::pair{"biases", bias}}) {
      if (!x.has_value()) continue;
      TORCH_CHECK_TYPE(x->scalar_type() == input.scalar_type(), "linear_int8: ", name, "[", i,
                       "] must have input's dtype ", input.scalar_type(), ", got ", x->scalar_type());
      TORCH_CHECK_VALUE(x->dim() == 1 && x->size(0) == w.size(0), "linear_int8: ", name, "[", i,
                        "] must be [N = ", w.size(0), "], got ", x->sizes());
      check_same_device("linear_int8", name, *x, input);
    }
  }
}

// Value checks, on every device. They need the values on the host; on a GPU that is a
// sync, so they are memoized per tensor (csrc/checks.cpp says when that is sound).

// Rejects unless 0 <= cache_lens[b] and cache_lens[b] + n <= S_max for every row.
// Returns max(cache_lens), which the CUDA kernels plan their key splits with
// (-1 for B == 0).
int64_t check_cache_lens_values(const char* op, const at::Tensor& cache_lens, int64_t n,
                                int64_t S_max);

// Rejects unless 0 <= page_table[b, j] < num_pages for every entry.
void check_page_table_values(const char* op, const at::Tensor& page_table, int64_t num_pages);

// Rejects unless -1 <= parents[b, i] < i for every node: a forest in topological
// order, which rules out cycles and self-loops.
void check_parents_values(const char* op, const at::Tensor& parents);

// tree_verify's inputs, checked (shapes and values) and contiguous, and its outputs
// (accepted [B], node [B], path [B, n]), unfilled.
struct TreeVerifyArgs {
  at::Tensor greedy, tokens, parents, accepted, node, path;
};
TreeVerifyArgs prepare_tree_verify(const at::Tensor& greedy, const at::Tensor& tokens,
                                   const at::Tensor& parents);

}  // namespace cllm_rt
