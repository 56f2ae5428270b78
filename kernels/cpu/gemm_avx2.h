// The GEMM driver for CPUs with AVX2 + FMA but neither AMX nor AVX-512 VNNI + BF16 (Zen 2/3,
// Haswell to Raptor Lake's big cores without AVX-512, and AVX-512 CPUs without BF16).
//
// Same packed weights and epilogue contract as the other drivers (gemm_drivers.h), except
// that int8 weights are packed in pairs of k (vnni = 2, kstep 32) instead of fours:
//   bf16: a packed 32-bit lane holds (w[k], w[k+1]) of one column; `<< 16` and `& 0xffff0000`
//         widen it to two float32 vectors (exact), multiplied by x (widened to float32 once
//         per call) with FMAs. The weights stay bf16 in memory: a decode step streams half
//         the bytes of the float32 GEMM this replaces, and the MLP's silu joins the epilogue.
//   int8: the pair sign-extends to int16 and vpmaddwd multiplies it by x's pair (x widened
//         to int16 once per call), giving w[k] x[k] + w[k+1] x[k+1] in int32, exact. That
//         is 16 multiply-adds per instruction against an FMA's 8, with a quarter of the
//         float32 GEMM's weight bytes. (vpmaddubsw, 32 per instruction, saturates its int16
//         sums for int8 x int8 operands and needs sign tricks costing as much as it saves.)
#pragma once

#include "common.h"
#include "gemm_layout.h"

#if defined(__AVX2__) && defined(__FMA__)
#define HEADRACE_AVX2_GEMM 1
#endif

namespace headrace_cpu {
namespace gemm {

#ifdef HEADRACE_AVX2_GEMM
// Rows per register block. Each row holds one accumulator per 8 columns of a 16-column tile
// half (two when R <= 2: even and odd k apart, so that a one-row decode step is not bound by
// the FMA latency of a single chain); with the widened weights and x, R = 4 fills 14 of the
// 16 ymm registers.
constexpr int64_t kAvx2Rows = 4;

// R rows × one 16-column half of a column group, bf16: acc[i][0..16) += Σk x[i][k] w[k][col].
// `b`: the half's first tile; consecutive k-steps are 2 * kTileBytes apart.
template <int R>
inline void avx2_bf16_half(const float* x, int64_t ldx, const char* b, int64_t kblocks,
                           float* acc) {
  constexpr int kSplit = R <= 2 ? 2 : 1;
  __m256 c[R][2][kSplit];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < 2; ++j)
      for (int s = 0; s < kSplit; ++s) c[i][j][s] = _mm256_setzero_ps();
  const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xffff0000u));
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const char* bt = b + kb * 2 * kTileBytes;
    const float* xk = x + kb * 32;
    for (int64_t r = 0; r < kTileRows; ++r) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bt + r * 64));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bt + r * 64 + 32));
      const __m256 even0 = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));
      const __m256 odd0 = _mm256_castsi256_ps(_mm256_and_si256(w0, high));
      const __m256 even1 = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
      const __m256 odd1 = _mm256_castsi256_ps(_mm256_and_si256(w1, high));
      for (int i = 0; i < R; ++i) {
        const __m256 x0 = _mm256_broadcast_ss(xk + i * ldx + 2 * r);
        const __m256 x1 = _mm256_broadcast_ss(xk + i * ldx + 2 * r + 1);
        c[i][0][0] = _mm256_fmadd_ps(x0, even0, c[i][0][0]);
        c[i][1][0] = _mm256_fmadd_ps(x0, even1, c[i][1][0]);
        c[i][0][kSplit - 1] = _mm256_fmadd_ps(x1, odd0, c[i][0][kSplit - 1]);
        c[i][1][kSplit - 1] = _mm256_fmadd_ps(x1, odd1, c[i][1][kSplit - 1]);
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int j = 0; j < 2; ++j) {
      __m256 v = c[i][j][0];
      if constexpr (kSplit == 2) v = _mm256_add_ps(v, c[i][j][1]);
      _mm256_storeu_ps(acc + i * 32 + j * 8, v);
    }
  }
}

// R rows × one 16-column half, int8 weights (vnni = 2) and int16 x: int32 sums into acc.
template <int R>
inline void avx2_int8_half(const int16_t* x, int64_t ldx, const char* b, int64_t kblocks,
                           int32_t* acc) {
  constexpr int64_t kHalfBytes = kTileRows * 32;  // a vnni-2 int8 tile: 16 pairs x 16 cols
  __m256i c[R][2];
  for (int i = 0; i < R; ++i) c[i][0] = c[i][1] = _mm256_setzero_si256();
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const char* bt = b + kb * 2 * kHalfBytes;
    const int16_t* xk = x + kb * 32;
    for (int64_t r = 0; r < kTileRows; ++r) {
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bt + r * 32)));
      const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bt + r * 32 + 16)));
      for (int i = 0; i < R; ++i) {
        int32_t pair;
        std::memcpy(&pair, xk + i * ldx + 2 * r, 4);
        const __m256i xp = _mm256_set1_epi32(pair);
        c[i][0] = _mm256_add_epi32(c[i][0], _mm256_madd_epi16(w0, xp));
        c[i][1] = _mm256_add_epi32(c[i][1], _mm256_madd_epi16(w1, xp));
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + i * 32), c[i][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + i * 32 + 8), c[i][1]);
  }
}

// Both halves of one column group for `rows` (1..kAvx2Rows) rows.
template <bool Int8, int R = kAvx2Rows>
inline void avx2_rows(int64_t rows, const void* x, int64_t ldx, const char* b, int64_t kblocks,
                      float* acc) {
  if constexpr (R > 1) {
    if (rows < R) return avx2_rows<Int8, R - 1>(rows, x, ldx, b, kblocks, acc);
  }
  if constexpr (Int8) {
    const int16_t* x16 = static_cast<const int16_t*>(x);
    int32_t* out = reinterpret_cast<int32_t*>(acc);
    constexpr int64_t kHalfBytes = kTileRows * 32;
    avx2_int8_half<R>(x16, ldx, b, kblocks, out);
    avx2_int8_half<R>(x16, ldx, b + kHalfBytes, kblocks, out + 16);
  } else {
    const float* x32 = static_cast<const float*>(x);
    avx2_bf16_half<R>(x32, ldx, b, kblocks, acc);
    avx2_bf16_half<R>(x32, ldx, b + kTileBytes, kblocks, acc + 16);
  }
}

// Same contract as amx_gemm / dot_gemm (x: bf16 or int8 rows `lda` bytes apart, K padded to
// whole k-steps of 32). x is widened once (float32 / int16) into a buffer all threads read.
template <bool Int8, typename Epilogue>
void avx2_gemm(const char* a, int64_t m, int64_t lda, const char* packed, int64_t groups,
               int64_t kblocks, const Epilogue& epilogue) {
  using Wide = std::conditional_t<Int8, int16_t, float>;
  const int64_t k = kblocks * 32;
  const int64_t group_bytes = kblocks * 2 * (Int8 ? kTileRows * 32 : kTileBytes);
  std::vector<Wide> wide(m * k);
  at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if constexpr (Int8) {
        const int8_t* src = reinterpret_cast<const int8_t*>(a + i * lda);
        int64_t j = 0;
        for (; j + 16 <= k; j += 16) {
          const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(&wide[i * k + j]), _mm256_cvtepi8_epi16(v));
        }
        for (; j < k; ++j) wide[i * k + j] = src[j];
      } else {
        to_float(reinterpret_cast<const at::BFloat16*>(a + i * lda), &wide[i * k], k);
      }
    }
  });
  // Rows in chunks of equal size (<= kAvx2Rows): a short chunk has fewer independent chains.
  const int64_t chunks = (m + kAvx2Rows - 1) / kAvx2Rows;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[kAvx2Rows * 32];
    for (int64_t g = begin; g < end; ++g) {
      const char* b = packed + g * group_bytes;
      for (int64_t chunk = 0, m0 = 0; chunk < chunks; ++chunk) {
        const int64_t rows = (m - m0) / (chunks - chunk);
        avx2_rows<Int8>(rows, wide.data() + m0 * k, k, b, kblocks, acc);
        epilogue(acc, m0, rows, g * kGroupCols);
        m0 += rows;
      }
    }
  });
}
#endif

}  // namespace gemm
}  // namespace headrace_cpu
