// The CPU linear kernel's tunables, set from Python (cllm_rt._C.set_linear_tuning).
#pragma once

#include <cstdint>

namespace cllm_rt {

// For calls with `dtype` inputs ("float32", "float64", "bfloat16" or "float16"; int8 weights
// follow their input's): calls of at most `tall_rows` input rows take cpu/linear.cpp's tall
// tiles (0: none do), and the next weight tile is prefetched into L2 (`to_l2`) or
// non-temporally. Both are faster on some CPUs and slower on others (tall tiles on an Intel
// Xeon family 6 model 106, wide on an AMD EPYC family 26; non-temporal on that EPYC, L2 on a
// Xeon with AMX), so cllm_rt.ops measures them on the machine at hand; the bits do not depend
// on either (row invariance). Returns false for another dtype name.
bool set_linear_tuning(const char* dtype, int64_t tall_rows, bool to_l2);

}  // namespace cllm_rt
