// The GEMM driver for CPUs with AVX2 + FMA but neither AMX nor AVX-512 VNNI (Zen 2/3, Haswell
// to Raptor Lake's big cores without AVX-512, Skylake-X).
//
// Same packed weights (AMX's signed int8 layout) and epilogue contract as the other drivers
// (gemm_drivers.h):
//   bf16: a packed 32-bit lane holds (w[k], w[k+1]) of one column; `<< 16` and `& 0xffff0000`
//         widen it to two float32 vectors (exact), multiplied by x (widened to float32 once
//         per call) with FMAs. The weights stay bf16 in memory: a decode step streams half
//         the bytes of the float32 GEMM this replaces, and the MLP's silu joins the epilogue.
//   int8: a lane holds 4 consecutive k of one column. vpmaddubsw multiplies unsigned by
//         signed bytes, so it gets |w| and x carrying w's sign (vpsignb): each int16 sum of
//         two products is at most 2 * 127 * 127 < 2^15 (codes are in [-127, 127]), so
//         nothing saturates and the int32 sums (vpmaddwd by ones) are exact. 32 products
//         per vpmaddubsw: on Zen 3, 1.5x the FMA path's multiply-adds per second, and a
//         quarter of the float32 GEMM's weight bytes. (Sign-extending the weights to int16
//         for vpmaddwd measured 2-3x slower: vpmovsxbw from memory is the bottleneck.)
#pragma once

#include "common.h"
#include "gemm_layout.h"

#if defined(__AVX2__) && defined(__FMA__)
#define HEADRACE_AVX2_GEMM 1
#endif

namespace headrace_cpu {
namespace gemm {

#ifdef HEADRACE_AVX2_GEMM
// Rows per register block: 6 rows x 2 accumulators (8 columns each) are 12 independent FMA
// chains, which with the widened weights and the broadcast x fill the 16 ymm registers.
// Each accumulator is its own named variable (HEADRACE_AVX2_ROWS below): GCC kept an array
// of them (`__m256 c[R][2]`) in memory or rotated it through register moves, which left the
// 4-row kernel at ~50% of the FMA peak (one Zen 3 core: 47-50 GFLOP/s of 101, against 71-97
// for this one in the same runs). The int8 kernel holds 4 more vectors (the weights' absolute
// values and the ones of vpmaddwd): 6 rows spilled 3 accumulators to the stack, which made a
// 6-row block cost ~2x a 5-row one per row (perf, a batch-32 W8A8 decode), so it takes 5.
constexpr int64_t kAvx2MaxRows = 6;
template <bool Int8>
constexpr int64_t kAvx2Rows = Int8 ? 5 : 6;
// Row chunks per block: a thread runs a block of rows (60-72) through all its column groups
// before the next block, so that those rows of x (<= 72 x K float32: 166 KB at K = 576) are
// read from its L2 rather than streamed from L3 once per group. At prefill sizes on two
// Zen 3 cores (M = 512, SmolLM2's shapes, medians of 6 interleaved rounds): gate_up 141 ->
// 162 GFLOP/s, down 136 -> 143, qkv 128 -> 138; one core gains nothing (it was at the FMA
// peak), and decode steps (<= 12 chunks) are one block, as before.
constexpr int64_t kAvx2BlockChunks = 12;

// X(i) for each row i of a register block (the `if constexpr (i < R)` inside X drops the
// rows a smaller block does not have).
#define HEADRACE_AVX2_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)

// The micro-kernels are not inlined into the driver: inlined, they shared the registers with
// its loop state and GCC spilled accumulators to the stack again.
#define HEADRACE_NOINLINE __attribute__((noinline))

// R rows × one 16-column half of a column group, bf16: acc[i][0..16) += Σk x[i][k] w[k][col].
// `b`: the half's first tile; consecutive k-steps are 2 * kTileBytes apart. Even k for every
// row, then odd k; with R <= 2 (decode steps of one or two sequences) odd k go to their own
// accumulators, so that the step is not bound by the FMA latency of too few chains.
template <int R>
HEADRACE_NOINLINE void avx2_bf16_half(const float* x, int64_t ldx, const char* b, int64_t kblocks,
                           const Prefetch& pf, float* acc) {
  static_assert(R >= 1 && R <= kAvx2MaxRows);
  constexpr bool kSplit = R <= 2;
#define HEADRACE_DECL(i)                                        \
  [[maybe_unused]] __m256 c##i##a = _mm256_setzero_ps(), c##i##b = c##i##a, d##i##a = c##i##a, \
                          d##i##b = c##i##a;
  HEADRACE_AVX2_ROWS(HEADRACE_DECL)
#undef HEADRACE_DECL
  const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xffff0000u));
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    pf.step(kb);
    const char* bt = b + kb * 2 * kTileBytes;
    const float* xk = x + kb * 32;
    for (int64_t r = 0; r < kTileRows; ++r) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bt + r * 64));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bt + r * 64 + 32));
      const __m256 even0 = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16));
      const __m256 even1 = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16));
#define HEADRACE_EVEN(i)                                                \
  if constexpr (i < R) {                                               \
    const __m256 xv = _mm256_broadcast_ss(xk + i * ldx + 2 * r);      \
    c##i##a = _mm256_fmadd_ps(xv, even0, c##i##a);                     \
    c##i##b = _mm256_fmadd_ps(xv, even1, c##i##b);                     \
  }
      HEADRACE_AVX2_ROWS(HEADRACE_EVEN)
#undef HEADRACE_EVEN
      const __m256 odd0 = _mm256_castsi256_ps(_mm256_and_si256(w0, high));
      const __m256 odd1 = _mm256_castsi256_ps(_mm256_and_si256(w1, high));
#define HEADRACE_ODD(i)                                                 \
  if constexpr (i < R) {                                               \
    const __m256 xv = _mm256_broadcast_ss(xk + i * ldx + 2 * r + 1);  \
    if constexpr (kSplit) {                                            \
      d##i##a = _mm256_fmadd_ps(xv, odd0, d##i##a);                    \
      d##i##b = _mm256_fmadd_ps(xv, odd1, d##i##b);                    \
    } else {                                                           \
      c##i##a = _mm256_fmadd_ps(xv, odd0, c##i##a);                    \
      c##i##b = _mm256_fmadd_ps(xv, odd1, c##i##b);                    \
    }                                                                  \
  }
      HEADRACE_AVX2_ROWS(HEADRACE_ODD)
#undef HEADRACE_ODD
    }
  }
#define HEADRACE_STORE(i)                                                          \
  if constexpr (i < R) {                                                          \
    if constexpr (kSplit) {                                                       \
      c##i##a = _mm256_add_ps(c##i##a, d##i##a);                                  \
      c##i##b = _mm256_add_ps(c##i##b, d##i##b);                                  \
    }                                                                             \
    _mm256_storeu_ps(acc + i * 32, c##i##a);                                      \
    _mm256_storeu_ps(acc + i * 32 + 8, c##i##b);                                  \
  }
  HEADRACE_AVX2_ROWS(HEADRACE_STORE)
#undef HEADRACE_STORE
}

// R rows × one 16-column half, int8 weights and x (rows `ldx` bytes apart): int32 sums into
// acc. Each packed tile row is 16 columns × 4 k (64 bytes).
template <int R>
HEADRACE_NOINLINE void avx2_int8_half(const int8_t* x, int64_t ldx, const char* b, int64_t kblocks,
                           const Prefetch& pf, int32_t* acc) {
  static_assert(R >= 1 && R <= kAvx2MaxRows);
#define HEADRACE_DECL(i) \
  [[maybe_unused]] __m256i c##i##a = _mm256_setzero_si256(), c##i##b = c##i##a;
  HEADRACE_AVX2_ROWS(HEADRACE_DECL)
#undef HEADRACE_DECL
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    pf.step(kb);
    const char* bt = b + kb * 2 * kTileBytes;
    const int8_t* xk = x + kb * 64;
    for (int64_t r = 0; r < kTileRows; ++r) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bt + r * 64));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bt + r * 64 + 32));
      const __m256i a0 = _mm256_sign_epi8(w0, w0), a1 = _mm256_sign_epi8(w1, w1);  // |w|
#define HEADRACE_ROW(i)                                                        \
  if constexpr (i < R) {                                                      \
    int32_t quad;                                                             \
    std::memcpy(&quad, xk + i * ldx + 4 * r, 4);                              \
    const __m256i xq = _mm256_set1_epi32(quad);                               \
    const __m256i p0 = _mm256_maddubs_epi16(a0, _mm256_sign_epi8(xq, w0));    \
    const __m256i p1 = _mm256_maddubs_epi16(a1, _mm256_sign_epi8(xq, w1));    \
    c##i##a = _mm256_add_epi32(c##i##a, _mm256_madd_epi16(p0, ones));         \
    c##i##b = _mm256_add_epi32(c##i##b, _mm256_madd_epi16(p1, ones));         \
  }
      HEADRACE_AVX2_ROWS(HEADRACE_ROW)
#undef HEADRACE_ROW
    }
  }
#define HEADRACE_STORE(i)                                                         \
  if constexpr (i < R) {                                                         \
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + i * 32), c##i##a);      \
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + i * 32 + 8), c##i##b);  \
  }
  HEADRACE_AVX2_ROWS(HEADRACE_STORE)
#undef HEADRACE_STORE
}

// Both halves of one column group for `rows` (1..kAvx2Rows) rows.
template <bool Int8, int R = kAvx2Rows<Int8>>
inline void avx2_rows(int64_t rows, const void* x, int64_t ldx, const char* b, int64_t kblocks,
                      const Prefetch& pf, float* acc) {
  if constexpr (R > 1) {
    if (rows < R) return avx2_rows<Int8, R - 1>(rows, x, ldx, b, kblocks, pf, acc);
  }
  if constexpr (Int8) {
    const int8_t* x8 = static_cast<const int8_t*>(x);
    int32_t* out = reinterpret_cast<int32_t*>(acc);
    avx2_int8_half<R>(x8, ldx, b, kblocks, pf, out);
    avx2_int8_half<R>(x8, ldx, b + kTileBytes, kblocks, pf.after(kblocks), out + 16);
  } else {
    const float* x32 = static_cast<const float*>(x);
    avx2_bf16_half<R>(x32, ldx, b, kblocks, pf, acc);
    avx2_bf16_half<R>(x32, ldx, b + kTileBytes, kblocks, pf.after(kblocks), acc + 16);
  }
}

// Same contract as amx_gemm / dot_gemm (x: bf16 or int8 rows `lda` bytes apart, K padded to
// whole k-steps). bf16 x is widened to float32 once, into a buffer all threads read.
template <bool Int8, typename Epilogue>
void avx2_gemm(const char* a, int64_t m, int64_t lda, const char* packed, int64_t groups,
               int64_t kblocks, const Epilogue& epilogue) {
  const int64_t group_bytes = kblocks * 2 * kTileBytes;
  std::vector<float> wide;
  const void* x = a;
  int64_t ldx = lda;  // in elements of x's type
  if constexpr (!Int8) {
    ldx = kblocks * 32;
    wide = widen_rows(a, m, lda, ldx);
    x = wide.data();
  }
  // Rows in chunks of equal size (<= kAvx2Rows): a short chunk has fewer independent chains.
  constexpr int64_t kRows = kAvx2Rows<Int8>;
  const int64_t chunks = (m + kRows - 1) / kRows;
  // The next group's lines spread evenly over the k-steps of this group's chunks in a block
  // (2 halves each); after a block's last group, the next block's first.
  const int64_t steps = 2 * std::min(chunks, kAvx2BlockChunks) * kblocks;
  const int64_t pf_lines = (group_bytes / 64 + steps - 1) / steps;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[kAvx2MaxRows * 32];
    for (int64_t c0 = 0, mb = 0; c0 < chunks; c0 += kAvx2BlockChunks) {
      const int64_t c1 = std::min(chunks, c0 + kAvx2BlockChunks);
      for (int64_t g = begin; g < end; ++g) {
        const char* b = packed + g * group_bytes;
        const char* next = g + 1 < end    ? b + group_bytes
                           : c1 < chunks ? packed + begin * group_bytes
                                         : b;
        int64_t m0 = mb;
        for (int64_t chunk = c0; chunk < c1; ++chunk) {
          const int64_t rows = (m - m0) / (chunks - chunk);
          const Prefetch pf{next + (chunk - c0) * 2 * kblocks * pf_lines * 64, pf_lines,
                            chunks == 1};
          const void* xm = Int8 ? static_cast<const void*>(static_cast<const int8_t*>(x) + m0 * ldx)
                                : static_cast<const void*>(static_cast<const float*>(x) + m0 * ldx);
          avx2_rows<Int8>(rows, xm, ldx, b, kblocks, pf, acc);
          epilogue(acc, m0, rows, g * kGroupCols);
          m0 += rows;
        }
        if (g + 1 == end) mb = m0;
      }
    }
  });
}
#endif

}  // namespace gemm
}  // namespace headrace_cpu
