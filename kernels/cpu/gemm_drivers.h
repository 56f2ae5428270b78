// The GEMM drivers behind kernels/cpu/gemm.cpp: AMX tiles; AVX-512 dot-product instructions
// (VNNI for int8; AVX512-BF16 for bf16, or FMAs on widened bf16 where the CPU lacks it) on
// CPUs without AMX; AVX2 + FMA (gemm_avx2.h) on CPUs with neither.
//
// All read the same packed weight layout (see gemm.cpp) and hand their float32 / int32 sums
// to the caller's epilogue in blocks of up to 32 rows x one 32-column group:
//   epilogue(const float* acc /* [rows][32], int32 bits for int8 */, m0, rows, col0).
#pragma once

#include "common.h"
#include "gemm_avx2.h"
#include "gemm_layout.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__)
#define HEADRACE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <chrono>
#include <cstdlib>
#include <string>

// The AVX-512 driver needs VNNI (int8); its bf16 GEMM runs on vdpbf16ps where the CPU has
// AVX512-BF16 and issues it fast enough (`bf16_on_fma`), else on FMAs (`fma_tile`).
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define HEADRACE_AVX512_DOT 1
#if defined(__AVX512BF16__)
#define HEADRACE_AVX512_BF16 1
#endif
#endif

namespace headrace_cpu {
namespace gemm {

inline bool amx_ready() {
#ifdef HEADRACE_AMX
  // Linux hands AMX state to a process only on request (idempotent; oneDNN does the same).
  // HEADRACE_CPU_GEMM=avx512 runs the AVX-512 driver instead (to test it on an AMX host);
  // read once, as the int8 weights are packed for one driver.
  static const bool ok = [] {
    const char* forced = std::getenv("HEADRACE_CPU_GEMM");
    if (forced != nullptr && std::string(forced) == "avx512") return false;
    constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

inline bool dot_ready() {
#ifdef HEADRACE_AVX512_DOT
  return true;
#else
  return false;
#endif
}

#ifdef HEADRACE_AVX512_BF16
// Issue rate (instructions per second, best of a few tries) of `kChains` independent
// accumulator chains of vdpbf16ps (Dot) or vfmadd231ps on one core.
template <bool Dot>
double issue_rate() {
  constexpr int kChains = 24, kIters = 4000;
  __m512 c[kChains];
  for (int i = 0; i < kChains; ++i) c[i] = _mm512_set1_ps(1e-3f * i);
  __m512 a = _mm512_set1_ps(1.0f), b = _mm512_set1_ps(0.5f);
  double best = 0.0;
  for (int attempt = 0; attempt < 5; ++attempt) {
    const auto start = std::chrono::steady_clock::now();
    for (int n = 0; n < kIters; ++n) {
#pragma GCC unroll 24
      for (int i = 0; i < kChains; ++i) {
        if constexpr (Dot) {
          c[i] = _mm512_dpbf16_ps(c[i], (__m512bh)_mm512_castps_si512(a),
                                  (__m512bh)_mm512_castps_si512(b));
        } else {
          c[i] = _mm512_fmadd_ps(a, b, c[i]);
        }
      }
      __asm__ volatile("" : "+v"(a));  // keeps the loop from being folded
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, kChains * static_cast<double>(kIters) / s);
  }
  float sink = 0.0f;
  for (int i = 0; i < kChains; ++i) sink += _mm512_reduce_add_ps(c[i]);
  __asm__ volatile("" : : "x"(sink));
  return best;
}
#endif

// bf16 GEMMs on FMAs over widened weights (`fma_tile`) instead of vdpbf16ps: where the CPU
// lacks AVX512-BF16, and where it issues vdpbf16ps (32 multiply-adds) at under half the rate
// of FMAs (16): on a 2-core Xeon (model 207, AVX512-BF16 without AMX) 1.35 G/s against 5.5
// G/s per core, and the FMA route ran prefill-sized bf16 GEMMs ~1.8x faster. Measured once
// (a few ms, at the first bf16 GEMM); HEADRACE_CPU_BF16=fma|dot decides instead.
inline bool bf16_on_fma() {
#ifndef HEADRACE_AVX512_BF16
  return true;
#else
  static const bool fma = [] {
    const char* forced = std::getenv("HEADRACE_CPU_BF16");
    if (forced != nullptr && std::string(forced) == "fma") return true;
    if (forced != nullptr && std::string(forced) == "dot") return false;
    // Alternated, so that a frequency change or a busy spell falls on both.
    double dot = 0.0, fma_rate = 0.0;
    for (int round = 0; round < 3; ++round) {
      dot = std::max(dot, issue_rate<true>());
      fma_rate = std::max(fma_rate, issue_rate<false>());
    }
    // The FMA route also widens each weight vector (2 more vector ops per 24 FMAs at 12 rows).
    return 16.0 * fma_rate > 1.25 * 32.0 * dot;
  }();
  return fma;
#endif
}

// The AVX2 driver runs where neither of the others can.
inline bool avx2_ready() {
#ifdef HEADRACE_AVX2_GEMM
  return !amx_ready() && !dot_ready();
#else
  return false;
#endif
}

#ifdef HEADRACE_AMX
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0-3: C[m-half][n-half]; tmm4-5: A[m-half]; tmm6-7: B[n-half]. Every row is 64 bytes.
inline void configure(int64_t rows0, int64_t rows1) {
  TileConfig cfg;
  const int64_t rows[8] = {rows0, rows0, rows1, rows1, rows0, rows1, 16, 16};
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = static_cast<uint8_t>(rows[i] > 0 ? rows[i] : 1);
    cfg.colsb[i] = 64;
  }
  _tile_loadconfig(&cfg);
}

// Column groups per block: a block's weights stay in L2 while every chunk of rows of x passes
// over them (7% faster than one group at a time for 512-row prefill GEMMs on AMX; repacking
// x into tile order as well measured 20% slower, so x is read in place).
constexpr int64_t kNBlock = 8;

// Weight tiles are prefetched this many k-steps ahead: a tile load that misses the caches
// stalls the tile unit, and the weights of a decode step come from DRAM. Sweep on a 2-core
// Xeon (SmolLM2's 121 projections, distinct weights): no prefetch 6.8 GB/s of weights at
// M = 32 and 15 GB/s at M = 1; 6 steps ahead 10.8 and 18.6 GB/s; 2-16 steps within noise.
constexpr int64_t kPrefetchSteps = 6;

// C += A · B on tiles C, A, B. A macro, not a template: GCC's tile intrinsics paste their
// arguments into the asm text (`%%tmm` #dst), so they must be literal tile numbers.
#define HEADRACE_TILE_DOT(INT8, C, A, B) \
  do {                                   \
    if constexpr (INT8) {                \
      _tile_dpbssd(C, A, B);             \
    } else {                             \
      _tile_dpbf16ps(C, A, B);           \
    }                                    \
  } while (0)

// One column group (32 columns) × up to 32 rows starting at `a` (row stride `lda` bytes),
// over `kblocks` tile steps; accumulators land in `acc` ([32][32] float32 or int32).
template <bool Int8>
inline void group_tile(const char* a, int64_t lda, const char* b, int64_t kblocks, bool two_rows,
                       void* acc) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const char* bt = b + kb * 2 * kTileBytes;
    const char* ahead = bt + kPrefetchSteps * 2 * kTileBytes;
    for (int64_t line = 0; line < 2 * kTileBytes; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
    _tile_loadd(6, bt, 64);
    _tile_loadd(7, bt + kTileBytes, 64);
    _tile_loadd(4, a + kb * 64, lda);
    HEADRACE_TILE_DOT(Int8, 0, 4, 6);
    HEADRACE_TILE_DOT(Int8, 1, 4, 7);
    if (two_rows) {
      _tile_loadd(5, a + 16 * lda + kb * 64, lda);
      HEADRACE_TILE_DOT(Int8, 2, 5, 6);
      HEADRACE_TILE_DOT(Int8, 3, 5, 7);
    }
  }
  // acc is [32 rows][32 cols]: C tiles at (0,0), (0,16), (16,0), (16,16); 128-byte rows.
  char* out = static_cast<char*>(acc);
  _tile_stored(0, out, 128);
  _tile_stored(1, out + 64, 128);
  if (two_rows) {
    _tile_stored(2, out + 16 * 128, 128);
    _tile_stored(3, out + 16 * 128 + 64, 128);
  }
}

// x: `a`, rows `lda` bytes apart, K padded to whole k-steps; rows in chunks of 32, column
// groups split across threads.
template <bool Int8, typename Epilogue>
void amx_gemm(const char* a, int64_t m, int64_t lda, const char* packed, int64_t groups,
              int64_t kblocks, const Epilogue& epilogue) {
  const int64_t group_bytes = kblocks * 2 * kTileBytes;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[32 * 32];
    int64_t configured = -1;
    for (int64_t g0 = begin; g0 < end; g0 += kNBlock) {
      const int64_t g1 = std::min(end, g0 + kNBlock);
      for (int64_t m0 = 0; m0 < m; m0 += 32) {
        const int64_t rows = std::min<int64_t>(32, m - m0);
        if (rows != configured) {
          configure(std::min<int64_t>(rows, 16), rows - 16);
          configured = rows;
        }
        for (int64_t g = g0; g < g1; ++g) {
          group_tile<Int8>(a + m0 * lda, lda, packed + g * group_bytes, kblocks, rows > 16, acc);
          epilogue(acc, m0, rows, g * kGroupCols);
        }
      }
    }
    _tile_release();
  });
}
#endif

#ifdef HEADRACE_AVX512_DOT
// Rows per register block: 2 * kDotRows accumulators + the weight vectors fit the 32 zmm
// registers, and 24 independent chains hide the dot instructions' latency.
constexpr int64_t kDotRows = 12;

// R rows × one column group. Each packed tile row is 16 columns × one k-group (4 int8 or 2
// bf16 consecutive k), which is what vpdpbusd / vdpbf16ps multiply by a k-group of one row
// of x broadcast to every lane. Int8: the weights are stored + 128 (unsigned, vpdpbusd's
// first operand), x signed, so each row's sums start at -128 * Σk x (`row_sums`) to undo
// the shift. bf16 on CPUs without AVX512-BF16: `fma_tile`.
template <bool Int8, int R>
inline void dot_tile(const char* a, int64_t lda, const char* b, int64_t kblocks,
                     const int32_t* row_sums, const Prefetch& pf, float* acc) {
  __m512i c[R][2];
  for (int i = 0; i < R; ++i) {
    if constexpr (Int8) {
      c[i][0] = c[i][1] = _mm512_set1_epi32(-128 * row_sums[i]);
    } else {
      c[i][0] = c[i][1] = _mm512_setzero_si512();
    }
  }
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    pf.step(kb);
    const char* bt = b + kb * 2 * kTileBytes;
    const char* at = a + kb * kTileRows * 4;
    for (int64_t r = 0; r < kTileRows; ++r) {
      const __m512i w0 = _mm512_loadu_si512(bt + r * 64);
      const __m512i w1 = _mm512_loadu_si512(bt + kTileBytes + r * 64);
      for (int i = 0; i < R; ++i) {
        int32_t pair;
        std::memcpy(&pair, at + i * lda + r * 4, 4);
        const __m512i x = _mm512_set1_epi32(pair);
        if constexpr (Int8) {
          c[i][0] = _mm512_dpbusd_epi32(c[i][0], w0, x);
          c[i][1] = _mm512_dpbusd_epi32(c[i][1], w1, x);
        } else {
#ifdef HEADRACE_AVX512_BF16
          c[i][0] = (__m512i)_mm512_dpbf16_ps((__m512)c[i][0], (__m512bh)x, (__m512bh)w0);
          c[i][1] = (__m512i)_mm512_dpbf16_ps((__m512)c[i][1], (__m512bh)x, (__m512bh)w1);
#endif
        }
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    _mm512_storeu_si512(acc + i * 32, c[i][0]);
    _mm512_storeu_si512(acc + i * 32 + 16, c[i][1]);
  }
}

// bf16 without AVX512-BF16 (Ice Lake, Cascade Lake): R rows of float32 x (`a`, rows `lda`
// bytes apart, widened once per call) × one column group, on FMAs. A packed 32-bit lane holds
// (w[k], w[k+1]) of one column; `<< 16` and `& 0xffff0000` widen it to two float32 vectors
// (exact), each multiplied by x[k] or x[k+1] broadcast. Twice the FMAs of vdpbf16ps, but the
// same weight bytes: a decode step (bound by the weight stream) runs as fast. Few rows keep
// even and odd k in separate accumulators, for enough independent FMA chains.
template <int R>
inline void fma_tile(const char* a, int64_t lda, const char* b, int64_t kblocks,
                     const Prefetch& pf, float* acc) {
  constexpr int kSplit = R < 4 ? 2 : 1;
  __m512 c[R][2][kSplit];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < 2; ++j)
      for (int s = 0; s < kSplit; ++s) c[i][j][s] = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u));
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    pf.step(kb);
    const char* bt = b + kb * 2 * kTileBytes;
    const char* xk = a + kb * kTileRows * 2 * sizeof(float);
    for (int64_t r = 0; r < kTileRows; ++r) {
      const __m512i w0 = _mm512_loadu_si512(bt + r * 64);
      const __m512i w1 = _mm512_loadu_si512(bt + kTileBytes + r * 64);
      // Even k for every row, then odd k: with both at once GCC ran out of registers and
      // rotated the accumulators through moves (a 512-bit move takes an FMA port).
      const __m512 even0 = _mm512_castsi512_ps(_mm512_slli_epi32(w0, 16));
      const __m512 even1 = _mm512_castsi512_ps(_mm512_slli_epi32(w1, 16));
      for (int i = 0; i < R; ++i) {
        const __m512 x0 = _mm512_set1_ps(reinterpret_cast<const float*>(xk + i * lda)[2 * r]);
        c[i][0][0] = _mm512_fmadd_ps(x0, even0, c[i][0][0]);
        c[i][1][0] = _mm512_fmadd_ps(x0, even1, c[i][1][0]);
      }
      const __m512 odd0 = _mm512_castsi512_ps(_mm512_and_si512(w0, high));
      const __m512 odd1 = _mm512_castsi512_ps(_mm512_and_si512(w1, high));
      for (int i = 0; i < R; ++i) {
        const __m512 x1 = _mm512_set1_ps(reinterpret_cast<const float*>(xk + i * lda)[2 * r + 1]);
        c[i][0][kSplit - 1] = _mm512_fmadd_ps(x1, odd0, c[i][0][kSplit - 1]);
        c[i][1][kSplit - 1] = _mm512_fmadd_ps(x1, odd1, c[i][1][kSplit - 1]);
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int j = 0; j < 2; ++j) {
      __m512 v = c[i][j][0];
      if constexpr (kSplit == 2) v = _mm512_add_ps(v, c[i][j][1]);
      _mm512_storeu_ps(acc + i * 32 + j * 16, v);
    }
  }
}

template <bool Int8, int R = kDotRows>
inline void dot_rows(int64_t rows, const char* a, int64_t lda, const char* b, int64_t kblocks,
                     const int32_t* row_sums, const Prefetch& pf, float* acc) {
  if constexpr (R > 1) {
    if (rows < R) return dot_rows<Int8, R - 1>(rows, a, lda, b, kblocks, row_sums, pf, acc);
  }
  if constexpr (!Int8) {
    if (bf16_on_fma()) return fma_tile<R>(a, lda, b, kblocks, pf, acc);
  }
  dot_tile<Int8, R>(a, lda, b, kblocks, row_sums, pf, acc);
}

// Same contract as amx_gemm; `row_sums` (int8 only): Σk x[m, k] for every row.
template <bool Int8, typename Epilogue>
void dot_gemm(const char* a, int64_t m, int64_t lda, const char* packed, int64_t groups,
              int64_t kblocks, const int32_t* row_sums, const Epilogue& epilogue) {
  const int64_t group_bytes = kblocks * 2 * kTileBytes;
  // fma_tile reads x as float32: widened once, into a buffer all threads read.
  std::vector<float> wide;
  if (!Int8 && bf16_on_fma()) {
    const int64_t k = kblocks * kTileRows * 2;
    wide = widen_rows(a, m, lda, k);
    a = reinterpret_cast<const char*>(wide.data());
    lda = k * sizeof(float);
  }
  // Chunks of equal size (64 rows: 6 x 10-11, not 5 x 12 + 4): a short chunk has too few
  // independent accumulators to hide the dot instructions' latency.
  const int64_t chunks = (m + kDotRows - 1) / kDotRows;
  // While one group's chunks run (its weights in L1/L2 after the first), the next group's
  // weights are prefetched, spread evenly over the chunks' k-steps: the weights of a decode
  // step come from DRAM, and a stream fetched only as the first chunk reaches it left that
  // chunk waiting (lm_head at 64 rows: 0.7x oneDNN's speed before, ~1x after).
  const int64_t pf_lines = (group_bytes / 64 + kblocks * chunks - 1) / (kblocks * chunks);
  // One or two chunks (<= 24 rows, decode steps of a few sequences) are bound by the weight
  // stream, which runs faster prefetched into L2 (1 row, SmolLM2's 212 MB of layer weights,
  // 2 threads on Zen 4: 22.7 -> 25.9 GB/s; 16 rows 15.4 -> 12.7 ms and 24 rows 16.9 -> 15.2
  // ms for the 120 projections, alternating in one process); with more chunks the later ones
  // reread each line, and prefetching into L1 is faster (64 rows: 8%).
  const bool pf_l2 = chunks <= 2;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[kDotRows * 32];
    for (int64_t g = begin; g < end; ++g) {
      const char* b = packed + g * group_bytes;
      const char* next = g + 1 < end ? b + group_bytes : b;
      for (int64_t chunk = 0, m0 = 0; chunk < chunks; ++chunk) {
        const int64_t rows = (m - m0) / (chunks - chunk);
        const Prefetch pf{next + chunk * kblocks * pf_lines * 64, pf_lines, pf_l2};
        const int32_t* sums = Int8 ? row_sums + m0 : nullptr;
        dot_rows<Int8>(rows, a + m0 * lda, lda, b, kblocks, sums, pf, acc);
        epilogue(acc, m0, rows, g * kGroupCols);
        m0 += rows;
      }
    }
  });
}
#endif

// Runs whichever driver this CPU has (the caller checks that one is ready). x: rows `lda`
// bytes apart, K zero-padded to whole k-steps (64 for int8, 32 for bf16).
template <bool Int8, typename Epilogue>
void run(const char* a, int64_t m, int64_t lda, const char* packed, int64_t groups,
         int64_t kblocks, const Epilogue& epilogue) {
#ifdef HEADRACE_AMX
  if (amx_ready()) return amx_gemm<Int8>(a, m, lda, packed, groups, kblocks, epilogue);
#endif
#ifdef HEADRACE_AVX512_DOT
  std::vector<int32_t> row_sums;
  if constexpr (Int8) {
    row_sums.resize(m);
    const int64_t k = kblocks * 64;
    for (int64_t i = 0; i < m; ++i) {
      const int8_t* row = reinterpret_cast<const int8_t*>(a + i * lda);
      __m512i s = _mm512_setzero_si512();
      for (int64_t j = 0; j < k; j += 64) {
        // Σ of 64 int8: vpdpbusd of ones (unsigned) by the codes (signed).
        s = _mm512_dpbusd_epi32(s, _mm512_set1_epi8(1), _mm512_loadu_si512(row + j));
      }
      row_sums[i] = _mm512_reduce_add_epi32(s);
    }
  }
  return dot_gemm<Int8>(a, m, lda, packed, groups, kblocks, row_sums.data(), epilogue);
#endif
#ifdef HEADRACE_AVX2_GEMM
  if (avx2_ready()) return avx2_gemm<Int8>(a, m, lda, packed, groups, kblocks, epilogue);
#endif
  TORCH_CHECK(false, "no GEMM kernel for this CPU (needs AMX, AVX-512 VNNI, or AVX2)");
}

}  // namespace gemm
}  // namespace headrace_cpu
