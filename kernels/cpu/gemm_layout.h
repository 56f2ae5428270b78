// The packed weight layout's dimensions, shared by the GEMM drivers (see gemm.cpp).
#pragma once

#include <cstdint>

namespace headrace_cpu {
namespace gemm {

constexpr int64_t kTileRows = 16;   // k-groups per packed tile (one 64-byte row each)
constexpr int64_t kGroupCols = 32;  // two 16-column tiles per column group
constexpr int64_t kTileBytes = kTileRows * 64;

}  // namespace gemm
}  // namespace headrace_cpu
