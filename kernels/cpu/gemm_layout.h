// The packed weight layout's dimensions and the weight prefetch, shared by the GEMM drivers
// (see gemm.cpp).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace headrace_cpu {
namespace gemm {

constexpr int64_t kTileRows = 16;   // k-groups per packed tile (one 64-byte row each)
constexpr int64_t kGroupCols = 32;  // two 16-column tiles per column group
constexpr int64_t kTileBytes = kTileRows * 64;

// The next column group's weights, fetched `lines` cache lines per k-step while this group
// runs: a decode step's weights come from DRAM, and the hardware prefetcher alone left the
// one-row GEMMs at about half of the memory bandwidth.
struct Prefetch {
  const char* base;
  int64_t lines;
  bool l2;  // into L2 (one chunk of rows: the stream is what bounds it) or L1

  void step(int64_t kb) const {
    const char* p = base + kb * lines * 64;
    for (int64_t line = 0; line < lines; ++line) {
      if (l2) {
        _mm_prefetch(p + line * 64, _MM_HINT_T1);
      } else {
        _mm_prefetch(p + line * 64, _MM_HINT_T0);
      }
    }
  }
  Prefetch after(int64_t kblocks) const { return {base + kblocks * lines * 64, lines, l2}; }
};

}  // namespace gemm
}  // namespace headrace_cpu
