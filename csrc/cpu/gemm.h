// Small dense products for the attention and LM-head kernels: a register-blocked
// micro-kernel in the BLIS style (C[rows x kCols vectors] += A[rows x K] * B[K x ...],
// rows <= kMR, A broadcast one element at a time, B streamed as kCols vectors per k), and a
// driver over a whole C: panels of two vectors, the last one of one vector when N needs it.
// A may have any row and column strides, so a transposed operand needs no copy; B and C
// are row-major with a column count that is a multiple of kVecLanes<acc_t> (callers pad
// their packed B panels with zeros). Every C element is its own accumulator over k in k
// order whatever the panel, so a column's values do not depend on how C is split.
#pragma once

#include "simd.h"

namespace cllm_rt {

constexpr int kMR = 6;  // 6 x 2 accumulator vectors + 2 B vectors + 1 broadcast = 15 registers
template <typename acc_t>
constexpr int kVecLanes = 32 / sizeof(acc_t);  // one 32-byte vector
template <typename acc_t>
constexpr int kNR = 2 * kVecLanes<acc_t>;  // two vectors per row

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// A is addressed as A[r * a_rs + k * a_cs].
struct StridedA {
  int64_t rs, cs;
};

template <typename acc_t, int kRows, int kCols, bool kAccumulate>
inline void micro_gemm(int64_t K, const acc_t* A, StridedA a, const acc_t* B, int64_t ldb,
                       acc_t* C, int64_t ldc) {
  using V = simd::Vec<acc_t>;
  constexpr int kW = kVecLanes<acc_t>;
  V acc[kRows][kCols];
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kCols; ++c) {
      acc[r][c] = kAccumulate ? simd::load<V>(C + r * ldc + c * kW) : V{};
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    V b[kCols];
    for (int c = 0; c < kCols; ++c) b[c] = simd::load<V>(B + k * ldb + c * kW);
    for (int r = 0; r < kRows; ++r) {
      const V x = simd::broadcast<V>(A[r * a.rs + k * a.cs]);
      for (int c = 0; c < kCols; ++c) acc[r][c] += x * b[c];
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kCols; ++c) simd::store(C + r * ldc + c * kW, acc[r][c]);
  }
}

// The last rows % kMR rows of C: picks the micro-kernel compiled for that count.
template <typename acc_t, int kCols, bool kAccumulate, int kRows = kMR - 1>
inline void micro_gemm_rows(int64_t rows, int64_t K, const acc_t* A, StridedA a, const acc_t* B,
                            int64_t ldb, acc_t* C, int64_t ldc) {
  if constexpr (kRows > 0) {
    if (rows == kRows) return micro_gemm<acc_t, kRows, kCols, kAccumulate>(K, A, a, B, ldb, C, ldc);
    micro_gemm_rows<acc_t, kCols, kAccumulate, kRows - 1>(rows, K, A, a, B, ldb, C, ldc);
  }
}

// One column panel of kCols vectors: every row block of C.
template <typename acc_t, int kCols, bool kAccumulate>
inline void gemm_panel(int64_t M, int64_t K, const acc_t* A, StridedA a, const acc_t* B,
                       int64_t ldb, acc_t* C, int64_t ldc) {
  int64_t i = 0;
  for (; i + kMR <= M; i += kMR) {
    micro_gemm<acc_t, kMR, kCols, kAccumulate>(K, A + i * a.rs, a, B, ldb, C + i * ldc, ldc);
  }
  micro_gemm_rows<acc_t, kCols, kAccumulate>(M - i, K, A + i * a.rs, a, B, ldb, C + i * ldc, ldc);
}

// C[M x N] (+)= A[M x K] * B[K x N]; N % kVecLanes<acc_t> == 0.
template <typename acc_t, bool kAccumulate>
void gemm(int64_t M, int64_t N, int64_t K, const acc_t* A, StridedA a, const acc_t* B,
          int64_t ldb, acc_t* C, int64_t ldc) {
  // Column panels outermost: a K x kNR panel of B stays in L1 across all row blocks.
  int64_t j = 0;
  for (; j + kNR<acc_t> <= N; j += kNR<acc_t>) {
    gemm_panel<acc_t, 2, kAccumulate>(M, K, A, a, B + j, ldb, C + j, ldc);
  }
  if (j < N) gemm_panel<acc_t, 1, kAccumulate>(M, K, A, a, B + j, ldb, C + j, ldc);
}

// dst[r][c] = src[r][c] widened to acc_t, zero-padded to dst_cols columns.
template <typename scalar_t, typename acc_t>
void pack_rows(const scalar_t* src, int64_t src_stride, int64_t rows, int64_t cols, acc_t* dst,
               int64_t dst_cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * src_stride;
    acc_t* d = dst + r * dst_cols;
    for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<acc_t>(s[c]);
    for (int64_t c = cols; c < dst_cols; ++c) d[c] = acc_t(0);
  }
}

// rows x cols of src (row stride cols) as acc_t rows of stride buf_cols: src itself
// when it already is that, else widened and zero-padded into buf.
template <typename scalar_t, typename acc_t>
const acc_t* rows_as_acc(const scalar_t* src, int64_t rows, int64_t cols, acc_t* buf,
                         int64_t buf_cols) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (buf_cols == cols) return src;
  }
  pack_rows(src, cols, rows, cols, buf, buf_cols);
  return buf;
}

}  // namespace cllm_rt
