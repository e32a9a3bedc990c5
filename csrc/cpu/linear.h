// The CPU linear kernel's tunables, set from Python (cllm_rt._C.set_linear_tuning).
#pragma once

#include <cstdint>

namespace cllm_rt {

// The tile shapes cpu/linear.cpp can give calls of one or two input rows (kPaired: one-row calls
// only; two-row calls take it as kWide).
enum class FewRowTiles : int64_t { kWide = 0, kTall = 1, kStreamed = 2, kPaired = 3 };

// For calls with `dtype` inputs ("float32", "float64", "bfloat16" or "float16"; int8 weights
// follow their input's): the tile shape of calls of one row and of two rows, and whether the next
// weight tile is prefetched into L2 rather than non-temporally, for calls of one row, of two rows
// and of more (`to_l2`). Each is faster on some CPUs and slower on others (tall tiles on an Intel
// Xeon family 6 model 106, wide on an AMD EPYC family 26, streamed rows (float32) and paired ones
// (bf16) at one row on an AMD EPYC Zen 4; non-temporal on the family 26 EPYC, L2 on a Xeon with
// AMX), and the best prefetch target can differ between shapes on one machine, so cllm_rt.ops
// measures them together on the machine at hand; the bits do not depend on any of them (row
// invariance). Returns false for another dtype name.
bool set_linear_tuning(const char* dtype, FewRowTiles one_row, FewRowTiles two_rows, const bool (&to_l2)[3]);

}  // namespace cllm_rt
