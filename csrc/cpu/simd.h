// Portable SIMD for the CPU kernels: GCC/Clang vector extensions.
//
// The vector types below lower to whatever the compiler targets (AVX2 or AVX-512
// with -march=native, SSE2 pairs with CLLM_RT_PORTABLE=1), so one source serves
// every x86-64 machine without intrinsics or torch's per-ISA dispatch.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

namespace cllm_rt::simd {

// kBytes-wide vector of T (32 bytes = one AVX2 register).
template <typename T, int kBytes = 32>
struct VecOf {
  typedef T type __attribute__((vector_size(kBytes)));
};
template <typename T, int kBytes = 32>
using Vec = typename VecOf<T, kBytes>::type;

// Signed integer of the same width as T: the element type of comparison masks.
template <typename T>
using MaskInt = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

template <typename V>
inline V load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
inline void store(void* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// A braced list of equal elements compiles to one broadcast instruction; V{} + x
// would really add 0.0 (no identity for -0.0) and a lane-by-lane fill does not fold.
template <typename V, typename T, size_t... kLane>
inline V broadcast_impl(T x, std::index_sequence<kLane...>) {
  return V{((void)kLane, x)...};
}
template <typename V, typename T>
inline V broadcast(T x) {
  return broadcast_impl<V>(x, std::make_index_sequence<sizeof(V) / sizeof(x)>{});
}

// Loads kLanes consecutive elements of scalar_t widened to the accumulation type
// acc_t (exactly: bf16/f16 -> f32 never rounds).
template <typename scalar_t, typename acc_t, int kLanes>
inline Vec<acc_t, kLanes * sizeof(acc_t)> load_widened(const scalar_t* p) {
  using Out = Vec<acc_t, kLanes * sizeof(acc_t)>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return load<Out>(p);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    // bf16 is the top half of an f32: widen the bits and shift.
    auto bits = load<Vec<uint16_t, kLanes * 2>>(p);
    auto wide = __builtin_convertvector(bits, Vec<uint32_t, kLanes * 4>) << 16;
    Out out;
    std::memcpy(&out, &wide, sizeof(out));
    return out;
  } else {
    static_assert(std::is_same_v<scalar_t, c10::Half>, "unsupported element type");
    return __builtin_convertvector(load<Vec<_Float16, kLanes * 2>>(p), Out);
  }
}

// exp(x) lane by lane. Floats use the Cephes expf polynomial (~1 ulp) after the
// range reduction x = k ln2 + r; inputs below -87 (incl. -inf) give 0, which is
// what the online softmax needs for masked scores, and NaN stays NaN. Doubles (a
// path kept for exactness, not speed) call std::exp.
template <typename VF>
inline VF exp(VF x) {
  if constexpr (sizeof(x[0]) == 8) {
    for (size_t l = 0; l < sizeof(VF) / 8; ++l) x[l] = std::exp(x[l]);
    return x;
  } else {
    using VI = Vec<int32_t, sizeof(VF)>;
    const VF xc = x < -87.f ? broadcast<VF>(-87.f) : (x > 88.f ? broadcast<VF>(88.f) : x);
    // Round x*log2(e) to the nearest integer k with the 1.5*2^23 trick.
    const VF shifter = broadcast<VF>(12582912.f);
    const VF kf_shifted = xc * 1.44269504088896341f + shifter;
    const VF kf = kf_shifted - shifter;
    VI ki;
    std::memcpy(&ki, &kf_shifted, sizeof(ki));
    ki -= 0x4B400000;  // bits of the shifter: leaves k in the low bits
    const VF r = xc - kf * 0.693359375f + kf * 2.12194440e-4f;
    VF p = broadcast<VF>(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    VF y = p * (r * r) + r + 1.f;
    VI ybits;
    std::memcpy(&ybits, &y, sizeof(ybits));
    ybits += ki << 23;  // y * 2^k; k >= -126 keeps it normal
    std::memcpy(&y, &ybits, sizeof(y));
    y = x < -87.f ? broadcast<VF>(0.f) : y;
    return x != x ? x : y;
  }
}

template <typename V>
inline V max(V a, V b) {
  return a > b ? a : b;
}

}  // namespace cllm_rt::simd
