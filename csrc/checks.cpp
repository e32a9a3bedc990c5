// The checks that need more than a header (checks.h): value checks of the ops' index
// tensors (cache_lens, parents, page_table), the same rejection on every device with
// one host sync per tensor rather than one per call on a GPU, and tree_verify's
// argument setup.
//
// Why a memo and not a sync per call: the decoding loop calls an attention op once per
// layer, every layer with the same cache_lens (and parents) tensor. Reading values back
// from a GPU stalls the host until the queue drains, so a sync per call would cost one
// stall per layer and would rule out CUDA graphs. Why not a device-side flag instead:
// a kernel can only record the error, and the host would see it at some later call or
// sync, i.e. raise from the wrong place or not at all. So each check reduces the tensor
// to two numbers (one sync on a GPU) and remembers them for that tensor: later calls
// with the same live tensor at the same version reuse them without a sync (in the loop:
// one sync per step, at the first layer). Inference tensors have no version counter,
// so an inference tensor written in place after a check is not checked again; for that
// case the CUDA kernels stay memory-safe on any values (lengths clamped, ancestor walks
// bounded). CPU tensors are summarized every call: it costs no sync, and the CPU
// kernels trust their checked values.
#include <ATen/ops/empty.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <array>
#include <mutex>
#include <utility>

#include "checks.h"

namespace cllm_rt {
namespace {

using Summary = std::pair<int64_t, int64_t>;  // two int64 numbers a check condition reads

enum class Kind { kCacheLens, kParents, kPageTable };

// On the host, whatever the device: the tensors are small (B or B * n values), so a
// copy costs one sync like a device reduction would, and a loop costs less than ATen ops.
Summary summarize(Kind kind, const at::Tensor& x) {
  const at::Tensor host = x.to(at::kCPU, at::kLong).contiguous();  // the one sync on a GPU
  const int64_t* v = host.const_data_ptr<int64_t>();
  const int64_t width = x.size(x.dim() - 1);
  Summary summary{v[0], v[0]};  // element 0: parents[b, 0] - 0
  for (int64_t e = 0; e < host.numel(); ++e) {
    summary.first = std::min(summary.first, v[e]);
    // cache_lens, page_table: (min, max); parents: (min parents[b, i], max parents[b, i] - i)
    summary.second = std::max(summary.second, kind != Kind::kParents ? v[e] : v[e] - e % width);
  }
  return summary;
}

struct Entry {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> tensor{
      c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>()};
  const void* data = nullptr;
  int64_t version = 0;
  Kind kind = Kind::kCacheLens;
  Summary summary{};
};

// A weak reference keeps the TensorImpl's memory from being reused while an entry
// names it, so "same live impl, same data pointer, same version" is the same values.
class Memo {
 public:
  Summary get(Kind kind, const at::Tensor& x) {
    if (!x.is_cuda() || x.numel() == 0) return x.numel() == 0 ? Summary{0, -1} : summarize(kind, x);
    const int64_t version = x.is_inference() ? 0 : x._version();
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      for (const Entry& e : entries_) {
        if (e.kind == kind && e.data == x.const_data_ptr() && e.version == version &&
            !e.tensor.expired() && e.tensor._unsafe_get_target() == x.unsafeGetTensorImpl()) {
          return e.summary;
        }
      }
    }
    const Summary summary = summarize(kind, x);  // outside the lock: it syncs
    const std::lock_guard<std::mutex> lock(mutex_);
    Entry& slot = entries_[next_++ % entries_.size()];
    slot = Entry{c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(
                     x.getIntrusivePtr()),
                 x.const_data_ptr(), version, kind, summary};
    return summary;
  }

 private:
  std::mutex mutex_;
  std::array<Entry, 8> entries_;  // a few live index tensors per step
  size_t next_ = 0;
};

Memo& memo() {
  static Memo instance;
  return instance;
}

}  // namespace

int64_t check_cache_lens_values(const char* op, const at::Tensor& cache_lens, int64_t n,
                                int64_t S_max) {
  const auto [lo, hi] = memo().get(Kind::kCacheLens, cache_lens);
  TORCH_CHECK_VALUE(cache_lens.numel() == 0 || (lo >= 0 && hi + n <= S_max), op,
                    ": cache_lens must satisfy 0 <= cache_lens[b] and cache_lens[b] + n <= S_max = ",
                    S_max, " (n = ", n, "), got values in [", lo, ", ", hi, "]");
  return hi;
}

void check_page_table_values(const char* op, const at::Tensor& page_table, int64_t num_pages) {
  const auto [lo, hi] = memo().get(Kind::kPageTable, page_table);
  TORCH_CHECK_VALUE(page_table.numel() == 0 || (lo >= 0 && hi < num_pages), op,
                    ": page_table must satisfy 0 <= page_table[b, j] < num_pages = ", num_pages,
                    ", got values in [", lo, ", ", hi, "]");
}

void check_parents_values(const char* op, const at::Tensor& parents) {
  const auto [lo, hi] = memo().get(Kind::kParents, parents);
  TORCH_CHECK_VALUE(parents.numel() == 0 || (lo >= -1 && hi < 0), op,
                    ": parents must satisfy -1 <= parents[b, i] < i (a forest in topological order, "
                    "-1 for a root), got values down to ", lo, " and parents[b, i] - i up to ", hi);
}

TreeVerifyArgs prepare_tree_verify(const at::Tensor& greedy, const at::Tensor& tokens,
                                   const at::Tensor& parents) {
  check_tree_verify(greedy, tokens, parents);
  check_parents_values("tree_verify", parents);
  const int64_t B = greedy.size(0), n = greedy.size(1);
  return {greedy.contiguous(), tokens.contiguous(), parents.contiguous(),
          at::empty({B}, greedy.options()), at::empty({B}, greedy.options()),
          at::empty({B, n}, greedy.options())};
}

}  // namespace cllm_rt
