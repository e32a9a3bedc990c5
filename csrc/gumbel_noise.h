// Gumbel noise for seeded sampling, a pure function of (row seed, position, token).
//
// Sampling token v from softmax(z / T) is the same as taking argmax_v(z_v / T + g_v)
// with g_v i.i.d. standard Gumbel (the Gumbel-max trick). When g depends only on the
// row's seed, the absolute position of the predicted token and the token id, a sampled
// token is a deterministic function of its prefix, like a greedy one: every decoding
// path verifies it with the greedy accept rule. The generator is counter-based
// (splitmix64's output function over a per-(seed, position) stream), so no state is
// carried and no [n, V] noise is stored. Framework-free and host/device: the CPU and
// CUDA kernels share it, and cllm_rt/ops.py repeats it in int64 torch ops bit for bit
// (gumbel_uniform_reference; tests/test_sampling.py checks they agree exactly).
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"  // CLLM_RT_HOST_DEVICE

namespace cllm_rt {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;  // splitmix64's stream increment

// splitmix64's output function: a bijective 64-bit mix with full avalanche.
CLLM_RT_HOST_DEVICE uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The key of one (seed, position) stream; token v draws its element v + 1.
CLLM_RT_HOST_DEVICE uint64_t gumbel_stream(uint64_t seed, uint64_t position) {
  return mix64(mix64(seed) + position * kGolden);
}

// A uniform in the open interval (0, 1): the top 53 bits, centred in their cell.
CLLM_RT_HOST_DEVICE double gumbel_uniform(uint64_t stream, uint64_t token) {
  return (static_cast<double>(mix64(stream + (token + 1) * kGolden) >> 11) + 0.5) * 0x1p-53;
}

// Standard Gumbel noise -log(-log(u)), finite since 0 < u < 1.
CLLM_RT_HOST_DEVICE double gumbel_noise(uint64_t stream, uint64_t token) {
  return -log(-log(gumbel_uniform(stream, token)));
}

}  // namespace cllm_rt
