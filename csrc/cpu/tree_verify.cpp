// tree_verify on CPU: the deepest node of a token tree that greedy decoding confirms.
//
// Node 0 is the root (the last verified token) and is confirmed; node i > 0 is
// confirmed when its parent is and its token is the parent's greedy successor,
// tokens[b, i] == greedy[b, parents[b, i]]. Roots other than node 0 (padding, other
// trees of a forest) are never confirmed. Topological order (parents[b, i] < i) makes
// one forward pass over the nodes enough; the deepest confirmed node, the smallest
// index among equally deep ones, ends the accepted path.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"

namespace cllm_rt {

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_verify_cpu(const at::Tensor& greedy,
                                                              const at::Tensor& tokens,
                                                              const at::Tensor& parents) {
  const TreeVerifyArgs args = prepare_tree_verify(greedy, tokens, parents);
  const int64_t B = args.greedy.size(0), n = args.greedy.size(1);
  const int64_t *g = args.greedy.const_data_ptr<int64_t>(),
                *t = args.tokens.const_data_ptr<int64_t>(),
                *p = args.parents.const_data_ptr<int64_t>();
  int64_t *a = args.accepted.data_ptr<int64_t>(), *e = args.node.data_ptr<int64_t>(),
          *path = args.path.data_ptr<int64_t>();
  std::fill(path, path + B * n, int64_t(-1));
  std::vector<int64_t> depth(n);  // -1: not confirmed
  for (int64_t b = 0; b < B; ++b) {
    const int64_t *gb = g + b * n, *tb = t + b * n, *pb = p + b * n;
    depth[0] = 0;
    int64_t best = 0;
    for (int64_t i = 1; i < n; ++i) {
      const int64_t parent = pb[i];
      depth[i] = parent >= 0 && depth[parent] >= 0 && tb[i] == gb[parent] ? depth[parent] + 1 : -1;
      if (depth[i] > depth[best]) best = i;  // strict: the smallest index among the deepest
    }
    a[b] = depth[best] + 1;
    e[b] = best;
    for (int64_t c = best; c >= 0; c = pb[c]) path[b * n + depth[c]] = c;
  }
  return {args.accepted, args.node, args.path};
}

TORCH_LIBRARY_IMPL(cllm_rt, CPU, m) { m.impl("tree_verify", &tree_verify_cpu); }

}  // namespace cllm_rt
