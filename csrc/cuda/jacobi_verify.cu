// jacobi_verify on CUDA: greedy tokens of a Jacobi block and its accepted length.
//
// One thread block per (b, i) logits row: each thread walks its share of the row
// with 16-byte loads (a scalar head up to the first 16-byte boundary and a scalar
// tail), keeping a running first-maximum and first-NaN; warp shuffles and shared
// memory then merge the threads with torch.argmax's rules. A second one-warp-per-
// 32-rows kernel on the same stream scans the accepted prefixes: no host sync.
#include "common.cuh"

namespace cllm_rt::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_argmax_kernel(const T* logits, int64_t n, int64_t V, int64_t sb, int64_t si,
                      int64_t* greedy) {
  using acc_t = Acc<T>;
  constexpr int kPack = Pack16<T>::kSize;
  const int64_t row = blockIdx.x;
  const T* x = logits + (row / n) * sb + (row % n) * si;
  const int64_t head =
      min(V, static_cast<int64_t>((16 - reinterpret_cast<uintptr_t>(x) % 16) % 16 / sizeof(T)));
  const int64_t packs = (V - head) / kPack;
  const int64_t tail = head + packs * kPack;

  RunningArgMax<acc_t> mine;
  for (int64_t j = threadIdx.x; j < head; j += kThreads) mine.push(to_acc(x[j]), j);
  const T* body = x + head;
  for (int64_t p = threadIdx.x; p < packs; p += kThreads) {
    const Pack16<T> pack = load16(body + p * kPack);
#pragma unroll
    for (int e = 0; e < kPack; ++e) mine.push(to_acc(pack.v[e]), head + p * kPack + e);
  }
  for (int64_t j = tail + threadIdx.x; j < V; j += kThreads) mine.push(to_acc(x[j]), j);

  const ArgMax<acc_t> best = block_reduce_argmax<acc_t, kThreads>(mine.result());
  if (threadIdx.x == 0) greedy[row] = best.index;
}

// accepted[b] = 1 + the longest k with block[b, k'+1] == greedy[b, k'] for k' < k.
__global__ void accepted_kernel(const int64_t* block, const int64_t* greedy, int64_t B,
                                int64_t n, int64_t* accepted) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= B) return;
  int64_t k = 0;
  while (k + 1 < n && block[b * n + k + 1] == greedy[b * n + k]) ++k;
  accepted[b] = k + 1;
}

}  // namespace

cudaError_t jacobi_verify(const void* logits, DType dtype, int64_t B, int64_t n, int64_t V,
                          int64_t sb, int64_t si, const int64_t* block, int64_t* greedy,
                          int64_t* accepted, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  const cudaError_t launched = dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    row_argmax_kernel<T><<<B * n, kThreads, 0, stream>>>(static_cast<const T*>(logits), n, V,
                                                         sb, si, greedy);
    return cudaGetLastError();
  });
  if (launched != cudaSuccess) return launched;
  constexpr int kScanThreads = 128;
  accepted_kernel<<<(B + kScanThreads - 1) / kScanThreads, kScanThreads, 0, stream>>>(
      block, greedy, B, n, accepted);
  return cudaGetLastError();
}

}  // namespace cllm_rt::cuda
