// linear on CPU: outputs[i] = input @ weights[i].T (+ biases[i]) for a few rows (tokens x batch)
// and several weights, each weight streamed from memory once for all rows; and linear_int8, the
// same with int8 weights and a scale per weight row.
//
// torch's small-row GEMM re-reads the weights per row (SmolLM2's LM head: 10.6 ms at 1 row,
// 20 ms at 2); here threads take blocks of weight rows, a tile of them stays in L1 while every
// input row passes over it, the inputs stay in L1/L2, and the next tile is prefetched while
// this one computes, so a forward over 8 tokens reads the weights at nearly the speed of one.
//
// Row invariance: each output element is its own vector accumulator over k, in k order,
// reduced across lanes in a fixed tree, with the same instructions whatever the row count
// (the tile shapes differ only in how many accumulators they hold). So a row's result does
// not depend on the other rows of the call: a token tree's forward gives bit for bit the
// tokens of a one-token forward, even in float32.
//
// int8 weights (linear_int8): (sum_k x[m][k] * q[n][k]) * scale[n] (+ bias[n]). The same kernel,
// its weight vectors converted to the input's float type in registers as they load (exactly: every
// int8 is a float), once per pass of up to kMR rows; so a row's bits still do not depend on the row
// count, and the weight stream is a quarter of float32's. Converting tiles into a buffer first, as
// bf16 on AVX2 does, measured 7.8 vs 4.8 ms for SmolLM2's layers at 1 row and 15.7 vs 7.0 at 4
// (Zen 5, 1 thread; float32 weights: 14.3 and 16.0).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../checks.h"
#include "linear.h"
#include "simd.h"

namespace cllm_rt {
namespace {

// Tiles of kM input rows x kN weight rows, one accumulator vector each: kM * kN accumulators +
// kN weight vectors + 1 input vector must fit the register file (32 zmm / 16 ymm). Wider calls
// take kMR rows per pass, so each weight vector loaded from memory feeds up to kMR FMAs (an
// 8-node tree in one pass). Calls of one or two rows (a one-token step) may take another shape
// (FewRowTiles; which is fastest is measured per machine: linear.h):
// - tall tiles: more weight rows streaming at once keep more cache misses in flight, where the
//   wide tiles' prefetch of the next tile does not already;
// - streamed rows (kN = 1): the weights read in memory order, one row after the other, which the
//   hardware prefetchers follow best. SmolLM2's linears at 1 row, AMD EPYC Zen 4, interleaved:
//   float32 26.7 vs 32.5 ms wide at 1 thread, 18.6 vs 19.9 at 2; at 4 rows and more they lose
//   (38 vs 31 ms), a weight vector feeding too few FMAs;
// - paired (one row only): the wide tiles run two rows over the same input row (its second result
//   dropped). On that Zen 4 a one-row pass over wide tiles waited on memory longer than a two-row
//   one, the row's products being free beside the weight stream: SmolLM2's one-token bf16 step
//   15.8 ms paired against 18.2 streamed and 29.0 wide (1 thread), 11.7 / 12.9 / 18.8 (2 threads);
//   float32 streamed rows stay faster (24.2 vs 27.5 ms paired).
#ifdef __AVX512F__
constexpr int kVecBytes = 64;
constexpr int kMR = 8, kNR = 3;          // 24 accumulators + 3 + 1 = 28 of 32 registers
constexpr int kFewMR = 2, kFewNR = 8;    // 16 + 8 + 1 = 25
#else
constexpr int kVecBytes = 32;
constexpr int kMR = 4, kNR = 2;          // 8 + 2 + 1 = 11 of 16 (4 x 3 spills)
constexpr int kFewMR = 2, kFewNR = 4;    // 8 + 4 + 1 = 13
#endif
constexpr int kMaxMR = std::max(kMR, kFewMR), kMaxNR = std::max(kNR, kFewNR);
constexpr int64_t kBlockRows = 24;  // weight rows per parallel task: a multiple of kNR and kFewNR
static_assert(kBlockRows % kNR == 0 && kBlockRows % kFewNR == 0);

// Per input dtype (set_linear_tuning): the tile shape of calls of 1 and of 2 rows, and whether
// the next weight tile is prefetched into L2 rather than non-temporally (Prefetch) in calls of 1,
// of 2 and of more rows.
constexpr const char* kDtypeNames[] = {"float32", "float64", "bfloat16", "float16"};
std::atomic<FewRowTiles> few_row_tiles[4][2] = {};  // wide
std::atomic<bool> prefetch_to_l2[4][3] = {};  // non-temporal

template <typename scalar_t>
constexpr int dtype_index() {
  if constexpr (std::is_same_v<scalar_t, float>) return 0;
  if constexpr (std::is_same_v<scalar_t, double>) return 1;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return 2;
  return 3;
}

template <typename acc_t>
using V = simd::Vec<acc_t, kVecBytes>;
template <typename acc_t>
constexpr int64_t kLanes = kVecBytes / sizeof(acc_t);

// The first `count` elements of p as a vector, zeros after (a row's tail). A masked load where
// the ISA has one: with a memcpy into the vector here (or out of it in reduce_lanes), GCC kept
// micro_dot's accumulators in memory, a store and a reload around every FMA. Registers measured
// 5-10 % faster on cache-resident weights (1 thread, Zen 5); a decoding step, which waits on
// memory, did not change measurably.
template <typename acc_t>
inline V<acc_t> load_partial(const acc_t* p, int64_t count) {
#if defined(__AVX512F__)
  if constexpr (sizeof(acc_t) == 4) {
    return (V<acc_t>)_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1), p);
  } else {
    return (V<acc_t>)_mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << count) - 1), p);
  }
#elif defined(__AVX2__)
  // lane i is loaded when its mask's sign bit is set: i < count
  if constexpr (sizeof(acc_t) == 4) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return (V<acc_t>)_mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(count), lane));
  } else {
    const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
    return (V<acc_t>)_mm256_maskload_pd(p, _mm256_cmpgt_epi64(_mm256_set1_epi64x(count), lane));
  }
#else
  V<acc_t> v{};
  std::memcpy(&v, p, count * sizeof(acc_t));
  return v;
#endif
}

// kLanes<acc_t> int8 values from p as acc_t lanes (exact). By intrinsics where there are some: GCC
// lowered __builtin_convertvector from int8 lanes to one scalar conversion per lane (4x slower).
template <typename acc_t>
inline V<acc_t> load_int8(const int8_t* p) {
#if defined(__AVX512F__)
  if constexpr (sizeof(acc_t) == 4) {
    return (V<acc_t>)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
  } else {
    return (V<acc_t>)_mm512_cvtepi32_pd(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
  }
#elif defined(__AVX2__)
  if constexpr (sizeof(acc_t) == 4) {
    return (V<acc_t>)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
  } else {
    return (V<acc_t>)_mm256_cvtepi32_pd(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(simd::load<int32_t>(p))));
  }
#else
  constexpr int kCount = kLanes<acc_t>;
  const auto ints = __builtin_convertvector(simd::load<simd::Vec<int8_t, kCount>>(p), simd::Vec<int32_t, kCount * 4>);
  return __builtin_convertvector(ints, V<acc_t>);
#endif
}

// Lanes [kFirst, kFirst + sizeof...(kLane)) of v, as a register shuffle.
template <size_t kFirst, typename Vec, size_t... kLane>
inline auto lanes(Vec v, std::index_sequence<kLane...>) {
  return __builtin_shufflevector(v, v, (kFirst + kLane)...);
}

// Sum of the lanes, halving the vector each step (a fixed order), by shuffles (see load_partial).
template <typename Vec>
inline auto reduce_lanes(Vec v) {
  constexpr size_t kCount = sizeof(Vec) / sizeof(v[0]);
  if constexpr (kCount == 2) {
    return v[0] + v[1];
  } else {
    constexpr auto kHalf = std::make_index_sequence<kCount / 2>{};
    return reduce_lanes(lanes<0>(v, kHalf) + lanes<kCount / 2>(v, kHalf));
  }
}

// The next weight tile, requested a few lines per k step while this one computes: a core busy
// with the FMAs of a wide tile issues no demand loads for the next one, and memory would idle.
// Where to: which is faster depends on the CPU, so cllm_rt.ops measures it (linear.h).
// - Non-temporal (hint 0): each weight is read once per step, and fetched into L2 it pushed out
//   what the step reuses (the KV cache, the activations, the code of the ops between the linears).
//   Against L2 (Zen 5, SmolLM2 float32 step, interleaved): 1 thread 22.8 -> 21.0 and
//   23.5 -> 21.8 ms at one token, 26.3 -> 21.7 at two; one-token attention after the linears
//   ~70 -> ~57 us a layer; bf16 unchanged.
// - L2 (hint 2): on an Intel Xeon with AMX (family 6 model 167), non-temporal lines reached L1
//   only and were gone before a tile's next pass needed them: SmolLM2's float32 layers at 8 rows
//   took 66 ms non-temporal, 31 with L2 (64 weights of 3.5 MB streamed, 1 thread).
// - Per row count, and with the shape: on that Xeon a bf16 one-token SmolLM2 step took 28.3 ms
//   on wide tiles prefetching into L2, 30.7 on tall tiles (which prefetch nothing) and 50.8 on wide
//   tiles prefetching non-temporally (1 thread), where calls of 8 rows measured L2 only 18 % ahead.
struct Prefetch {
  const char* next;  // nullptr: nothing to fetch
  int64_t bytes;
  bool to_l2;  // else non-temporal
  // Step `step` of a tile's k loop asks for lines [step * count, (step + 1) * count).
  inline void lines(int64_t step, int count) const {
    for (int64_t offset = step * count * 64; count > 0 && offset < bytes; --count, offset += 64) {
      if (to_l2) {
        __builtin_prefetch(next + offset, 0, 2);
      } else {
        __builtin_prefetch(next + offset, 0, 0);
      }
    }
  }
};

// out[m][n] = sum_k x[m][k] * w[n][k] for kM input rows and kN weight rows; x are acc_t rows, w
// acc_t or int8 rows (converted in registers as they load: exact), of strides ldx / ldw. An int8
// row's tail (K % L elements) comes converted and zero-padded in w_tail[n * L ..]: a partial
// int8 load would go through memory and, as in load_partial, keep the accumulators there. Out of
// line: inlined into the block loop, GCC spilled accumulators beside the prefetch bookkeeping
// (measured 2x slower at 16 rows).
template <typename acc_t, typename w_t, int kM, int kN>
__attribute__((noinline)) void micro_dot(int64_t K, const acc_t* x, int64_t ldx, const w_t* w,
                                         int64_t ldw, const acc_t* w_tail, Prefetch prefetch,
                                         acc_t (*out)[kMaxNR]) {
  constexpr int64_t L = kLanes<acc_t>;
  V<acc_t> acc[kM][kN];
  for (int m = 0; m < kM; ++m)
    for (int n = 0; n < kN; ++n) acc[m][n] = V<acc_t>{};
  const auto step = [&](int64_t k, auto load_x, auto load_w) {
    if (prefetch.next) prefetch.lines(k / L, kN * sizeof(V<acc_t>) / 64);
    V<acc_t> wv[kN];
    for (int n = 0; n < kN; ++n) wv[n] = load_w(n);
    for (int m = 0; m < kM; ++m) {
      const V<acc_t> xv = load_x(x + m * ldx);
      for (int n = 0; n < kN; ++n) acc[m][n] += xv * wv[n];
    }
  };
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    const auto load = [k](const acc_t* p) { return simd::load<V<acc_t>>(p + k); };
    step(k, load, [&](int n) {
      if constexpr (std::is_same_v<w_t, acc_t>) {
        return load(w + n * ldw);
      } else {
        return load_int8<acc_t>(w + n * ldw + k);
      }
    });
  }
  if (k < K) {
    const auto load = [k, K](const acc_t* p) { return load_partial(p + k, K - k); };
    step(k, load, [&](int n) {
      if constexpr (std::is_same_v<w_t, acc_t>) {
        return load(w + n * ldw);
      } else {
        return simd::load<V<acc_t>>(w_tail + n * L);
      }
    });
  }
  for (int m = 0; m < kM; ++m)
    for (int n = 0; n < kN; ++n) out[m][n] = reduce_lanes(acc[m][n]);
}

// Calls Dot::run<kM, kN>(args...) for the runtime rows <= kMaxM and cols <= kMaxN.
template <typename Dot, int kM, int kN, typename... Args>
inline void dispatch_tile(int64_t rows, int64_t cols, Args... args) {
  if constexpr (kM > 0 && kN > 0) {
    if (rows < kM) return dispatch_tile<Dot, kM - 1, kN>(rows, cols, args...);
    if (cols < kN) return dispatch_tile<Dot, kM, kN - 1>(rows, cols, args...);
    Dot::template run<kM, kN>(args...);
  }
}

// The micro-kernel on operands widened to acc_t (what every dtype can do), or on int8 weights.
template <typename acc_t, typename w_t = acc_t>
struct WidenedDot {
  template <int kM, int kN>
  static void run(int64_t K, const acc_t* x, int64_t ldx, const w_t* w, int64_t ldw,
                  const acc_t* w_tail, Prefetch prefetch, acc_t (*out)[kMaxNR]) {
    micro_dot<acc_t, w_t, kM, kN>(K, x, ldx, w, ldw, w_tail, prefetch, out);
  }
};

#ifdef __AVX512BF16__
// bf16 inputs and weights as they are: VDPBF16PS multiplies 32 bf16 pairs and adds them into
// 16 float32 lanes per instruction, so nothing is widened first and a chunk of 32 k costs one
// instruction per (row, weight row). torch's bf16 one-row GEMM ran at ~7 GMAC/s here (as slow
// as float32 on cache-resident weights). Row invariance as for micro_dot: one accumulator per
// output element, chunks in k order, the same reduction whatever kM.
struct Bf16PairDot {
  template <int kM, int kN>
  __attribute__((noinline)) static void run(int64_t K, const c10::BFloat16* x, int64_t ldx,
                                            const c10::BFloat16* w, int64_t ldw,
                                            Prefetch prefetch, float (*out)[kMaxNR]) {
    __m512 acc[kM][kN];
    for (int m = 0; m < kM; ++m)
      for (int n = 0; n < kN; ++n) acc[m][n] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      // a row's tail reads zeros: 0 * 0 adds nothing
      const __mmask32 mask = K - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
      if (prefetch.next) prefetch.lines(k / 32, kN);
      __m512bh wv[kN];
      for (int n = 0; n < kN; ++n) wv[n] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + n * ldw + k);
      for (int m = 0; m < kM; ++m) {
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * ldx + k);
        for (int n = 0; n < kN; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], xv, wv[n]);
      }
    }
    for (int m = 0; m < kM; ++m)
      for (int n = 0; n < kN; ++n) out[m][n] = _mm512_reduce_add_ps(acc[m][n]);
  }
};
constexpr bool kBf16PairDot = true;
#else
constexpr bool kBf16PairDot = false;
#endif

// One weight (with its per-row scales for int8 weights, its bias; nullptr: none) and its output [R, N].
template <typename scalar_t, typename weight_t = scalar_t>
struct Projection {
  const weight_t* weight;
  const scalar_t* scale;
  const scalar_t* bias;
  scalar_t* out;
  int64_t N;
};

// One tile: rows x cols outputs of the tile shape kM x kN at most, input rows ldx apart (0: one row
// read for every tile row, the paired shape).
template <int kM, int kN, typename scalar_t, typename weight_t, typename acc_t>
inline void tile(bool pair_dot, int64_t rows, int64_t cols, int64_t K, int64_t ldx, const scalar_t* input,
                 const acc_t* x, const weight_t* w_src, const acc_t* w, const acc_t* w_tail,
                 Prefetch prefetch, acc_t (*out)[kMaxNR]) {
#ifdef __AVX512BF16__
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (pair_dot) return dispatch_tile<Bf16PairDot, kM, kN>(rows, cols, K, input, ldx, w_src, K, prefetch, out);
  }
#endif
  if constexpr (std::is_same_v<weight_t, int8_t>) {
    dispatch_tile<WidenedDot<acc_t, int8_t>, kM, kN>(rows, cols, K, x, ldx, w_src, K, w_tail, prefetch, out);
  } else {
    dispatch_tile<WidenedDot<acc_t>, kM, kN>(rows, cols, K, x, ldx, w, K, w_tail, prefetch, out);
  }
}

template <typename scalar_t, typename weight_t>
void linear_kernel(const scalar_t* input, int64_t R, int64_t K,
                   const std::vector<Projection<scalar_t, weight_t>>& projections) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kWiden = !std::is_same_v<scalar_t, acc_t>;
  constexpr bool kPairDot = kBf16PairDot && std::is_same_v<scalar_t, c10::BFloat16>;  // reads bf16 as is
  constexpr bool kWidenTiles = kWiden && !kPairDot;  // weights widened tile by tile into a buffer
  constexpr bool kInt8 = std::is_same_v<weight_t, int8_t>;  // converted in micro_dot instead
  static_assert(!kInt8 || !kWiden, "int8 weights take float32 or float64 inputs");
  constexpr int64_t L = kLanes<acc_t>;
  // The input rows widened once (they are read once per weight block).
  std::vector<acc_t> xbuf(kWidenTiles ? R * K : 0);
  for (int64_t i = 0; i < static_cast<int64_t>(xbuf.size()); ++i) xbuf[i] = input[i];
  const acc_t* x = kWiden ? xbuf.data() : reinterpret_cast<const acc_t*>(input);
  // int8 weights take their input dtype's tuning (it only moves the speed, never a bit)
  const FewRowTiles shape = R <= 2 ? few_row_tiles[dtype_index<scalar_t>()][R - 1].load() : FewRowTiles::kWide;
  const bool tall = shape == FewRowTiles::kTall;
  const bool paired = R == 1 && shape == FewRowTiles::kPaired;  // the row read twice (ldx 0), one result kept
  const bool to_l2 = prefetch_to_l2[dtype_index<scalar_t>()][std::min<int64_t>(R, 3) - 1];
  const int64_t tile_rows = tall ? kFewMR : kMR;
  const int64_t tile_cols = tall ? kFewNR : shape == FewRowTiles::kStreamed ? 1 : kNR;

  // Tasks: kBlockRows-row blocks of every weight, numbered across the weights.
  std::vector<int64_t> first_block(projections.size() + 1, 0);
  for (size_t p = 0; p < projections.size(); ++p) {
    first_block[p + 1] = first_block[p] + (projections[p].N + kBlockRows - 1) / kBlockRows;
  }
  at::parallel_for(0, first_block.back(), 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> wbuf(kWidenTiles ? kMaxNR * K : 0);
    alignas(64) acc_t w_tail[kMaxNR * L];  // an int8 tile's row tails, converted (micro_dot)
    acc_t out[kMaxMR][kMaxNR];
    for (int64_t block = begin; block < end; ++block) {
      const size_t p = std::upper_bound(first_block.begin(), first_block.end(), block) -
                       first_block.begin() - 1;
      const Projection<scalar_t, weight_t>& proj = projections[p];
      const int64_t n_end = std::min(proj.N, (block - first_block[p] + 1) * kBlockRows);
      for (int64_t n0 = (block - first_block[p]) * kBlockRows; n0 < n_end; n0 += tile_cols) {
        const int64_t cols = std::min(tile_cols, n_end - n0);
        const weight_t* w_src = proj.weight + n0 * K;
        if constexpr (kWidenTiles) {
          for (int64_t i = 0; i < cols * K; ++i) wbuf[i] = w_src[i];
        }
        const acc_t* w = kWiden ? wbuf.data() : reinterpret_cast<const acc_t*>(w_src);  // int8: unused
        if constexpr (kInt8) {
          const int64_t tail = K % L;
          for (int64_t n = 0; tail > 0 && n < cols; ++n)
            for (int64_t i = 0; i < L; ++i) w_tail[n * L + i] = i < tail ? w_src[n * K + K - tail + i] : 0;
        }
        // The tile after this one in memory (the next block's first at a block's end, which
        // this thread most likely takes next), during the first pass over the rows. Not for
        // tall tiles, which are quick to compute: there the prefetches only cost (measured
        // 47 vs 50 ms for SmolLM2's layers at 1 row, against 71 vs 57 ms without at 8 rows).
        // int8 tiles prefetch at every row count: without the next tile in flight, tall tiles
        // waited on memory (SmolLM2's layers at 1 row, Zen 5, 1 thread: 7.4 vs 4.9 ms).
        const int64_t ahead = tall && !kInt8 ? 0 : std::min(tile_cols, proj.N - n0 - cols) * K;
        for (int64_t r0 = 0; r0 < R; r0 += tile_rows) {
          const int64_t rows = std::min(tile_rows, R - r0);
          const Prefetch prefetch{!kWidenTiles && r0 == 0 && ahead > 0
                                      ? reinterpret_cast<const char*>(w_src + cols * K) : nullptr,
                                  ahead * static_cast<int64_t>(sizeof(weight_t)), to_l2};
          if (tall) {
            tile<kFewMR, kFewNR>(kPairDot, rows, cols, K, K, input + r0 * K, x + r0 * K, w_src, w,
                                 w_tail, prefetch, out);
          } else {
            tile<kMR, kNR>(kPairDot, paired ? 2 : rows, cols, K, paired ? 0 : K, input + r0 * K, x + r0 * K,
                           w_src, w, w_tail, prefetch, out);
          }
          for (int64_t m = 0; m < rows; ++m) {
            for (int64_t n = 0; n < cols; ++n) {
              const acc_t b = proj.bias ? static_cast<acc_t>(proj.bias[n0 + n]) : acc_t(0);
              acc_t dot = out[m][n];
              if constexpr (kInt8) dot *= proj.scale[n0 + n];
              proj.out[(r0 + m) * proj.N + n0 + n] = static_cast<scalar_t>(proj.bias ? dot + b : dot);
            }
          }
        }
      }
    }
  });
}

}  // namespace

bool set_linear_tuning(const char* dtype, FewRowTiles one_row, FewRowTiles two_rows, const bool (&to_l2)[3]) {
  for (int i = 0; i < 4; ++i) {
    if (std::strcmp(dtype, kDtypeNames[i]) == 0) {
      few_row_tiles[i][0] = one_row;
      few_row_tiles[i][1] = two_rows;
      for (int rows = 0; rows < 3; ++rows) prefetch_to_l2[i][rows] = to_l2[rows];
      return true;
    }
  }
  return false;
}

// The glue both ops share: contiguous operands kept alive until the kernel is done, outputs
// [..., N_i], linear_kernel for the input's dtype; kInt8: int8 weights with their scales.
template <bool kInt8>
std::vector<at::Tensor> run_linear(const at::Tensor& input, at::TensorList weights, at::TensorList scales,
                                   const c10::List<std::optional<at::Tensor>>& biases) {
  const at::Tensor x = input.contiguous();
  const int64_t K = x.size(-1), R = x.numel() / K;  // K >= 1: checked
  std::vector<at::Tensor> keep, outputs;  // per weight: the weight, its scales (or none), its bias (or none)
  for (size_t i = 0; i < weights.size(); ++i) {
    keep.push_back(weights[i].contiguous());
    keep.push_back(kInt8 ? scales[i].contiguous() : at::Tensor());
    const std::optional<at::Tensor> bias = biases.get(i);
    keep.push_back(bias.has_value() ? bias->contiguous() : at::Tensor());
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
    shape.push_back(weights[i].size(0));
    outputs.push_back(at::empty(shape, x.options()));
  }
  const auto run = [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    using weight_t = std::conditional_t<kInt8, int8_t, scalar_t>;
    std::vector<Projection<scalar_t, weight_t>> projections;
    for (size_t i = 0; i < weights.size(); ++i) {
      const at::Tensor& scale = keep[3 * i + 1];
      const at::Tensor& bias = keep[3 * i + 2];
      projections.push_back({keep[3 * i].const_data_ptr<weight_t>(),
                             scale.defined() ? scale.const_data_ptr<scalar_t>() : nullptr,
                             bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                             outputs[i].data_ptr<scalar_t>(), weights[i].size(0)});
    }
    if (R > 0) linear_kernel<scalar_t, weight_t>(x.const_data_ptr<scalar_t>(), R, K, projections);
  };
  if constexpr (kInt8) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_int8_cpu", [&] { run(scalar_t{}); });
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "linear_cpu",
                                    [&] { run(scalar_t{}); });
  }
  return outputs;
}

std::vector<at::Tensor> linear_cpu(const at::Tensor& input, at::TensorList weights,
                                   const c10::List<std::optional<at::Tensor>>& biases) {
  check_linear(input, weights, biases);
  return run_linear<false>(input, weights, {}, biases);
}

std::vector<at::Tensor> linear_int8_cpu(const at::Tensor& input, at::TensorList weights,
                                        at::TensorList scales,
                                        const c10::List<std::optional<at::Tensor>>& biases) {
  check_linear_int8(input, weights, scales, biases);
  return run_linear<true>(input, weights, scales, biases);
}

TORCH_LIBRARY_IMPL(cllm_rt, CPU, m) {
  m.impl("linear", &linear_cpu);
  m.impl("linear_int8", &linear_int8_cpu);
}

}  // namespace cllm_rt
