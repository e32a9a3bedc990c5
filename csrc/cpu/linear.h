// The CPU linear kernel's one tunable, set from Python (cllm_rt._C.set_linear_tall_tile_rows).
#pragma once

#include <cstdint>

namespace cllm_rt {

// Calls of at most `rows` input rows of `dtype` ("float32", "float64", "bfloat16" or "float16")
// take cpu/linear.cpp's tall tiles; 0: none do. Which tile streams one row's weights faster
// differs by CPU (tall on an Intel Xeon family 6 model 106, wide on an AMD EPYC family 26), so
// cllm_rt.ops measures it on the machine at hand; the bits do not depend on it (row
// invariance). Returns false for another dtype name.
bool set_linear_tall_tile_rows(const char* dtype, int64_t rows);

}  // namespace cllm_rt
