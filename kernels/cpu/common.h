// Shared helpers of the CPU kernels: dtype dispatch, float32 row conversion, vector math.
//
// Every kernel reads its inputs into float32, computes in float32 and rounds once to the
// output dtype (as the Triton kernels do). ops/cpu_kernels.py builds these files with
// -march=native and the at::vec capability of the host (AVX512, AVX2 or scalar).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

// The model dtypes: float32, bfloat16, float16.
#define HEADRACE_DISPATCH_FLOAT(TYPE, NAME, ...)                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)         \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)              \
                             AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace headrace_cpu {

using Vec = at::vec::Vectorized<float>;

// W consecutive values of T (a float type, or int8 codes) widened to float32 in one vector.
template <typename T>
inline Vec load_float(const T* src) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(src);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, int8_t>) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
      return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw));
    } else {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
      } else {
        static_assert(std::is_same_v<T, c10::Half>);
        return _mm512_cvtph_ps(raw);
      }
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, int8_t>) {
      const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
      return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
    } else {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
      } else {
        static_assert(std::is_same_v<T, c10::Half>);
        return _mm256_cvtph_ps(raw);
      }
    }
#else
    float values[Vec::size()];
    for (int64_t i = 0; i < Vec::size(); ++i) values[i] = static_cast<float>(src[i]);
    return Vec::loadu(values);
#endif
  }
}

// `count` (<= W) int32 values converted to float32 (the lanes past `count` zero).
inline Vec int32_to_float(const int32_t* src, int64_t count = Vec::size()) {
  if (count == Vec::size()) {
#if defined(CPU_CAPABILITY_AVX512)
    return _mm512_cvtepi32_ps(_mm512_loadu_si512(src));
#elif defined(CPU_CAPABILITY_AVX2)
    return _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
#endif
  }
  float values[Vec::size()] = {};
  for (int64_t i = 0; i < count; ++i) values[i] = static_cast<float>(src[i]);
  return Vec::loadu(values);
}

// One vector per step (at::vec's widening of bf16/fp16 arrays is its generic per-element
// loop).
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) load_float(src + i).store(dst + i);
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// `m` bf16 rows of `k` elements, `lda` bytes apart → float32 [m, k] (rows split across
// threads): the GEMM drivers without bf16 instructions widen x once per call, not per tile.
inline std::vector<float> widen_rows(const char* a, int64_t m, int64_t lda, int64_t k) {
  std::vector<float> wide(m * k);
  at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      to_float(reinterpret_cast<const at::BFloat16*>(a + i * lda), &wide[i * k], k);
    }
  });
  return wide;
}

// The first index of the row's maximum (NaN counts as the maximum, as in torch.argmax).
inline int64_t first_argmax(const float* row, int64_t n) {
  const float max = at::vec::reduce_all<float>(
      [](Vec a, Vec b) { return at::vec::maximum(a, b); }, row, n);
  int64_t index = 0;
  if (std::isnan(max)) {
    while (!std::isnan(row[index])) ++index;
  } else {
    while (row[index] != max) ++index;
  }
  return index;
}

// Lanes of a >= b (ordered: NaN compares false) as bits, lane i in bit i.
inline int ge_mask(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return static_cast<int>(_mm512_cmp_ps_mask(a, b, _CMP_GE_OQ));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GE_OQ));
#else
  float x[Vec::size()], y[Vec::size()];
  a.store(x);
  b.store(y);
  int mask = 0;
  for (int64_t i = 0; i < Vec::size(); ++i) mask |= (x[i] >= y[i]) << i;
  return mask;
#endif
}

// Round to T (nearest even); at::vec's vector conversion (a scalar c10 rounding per element
// was the largest cost of the row kernels at prefill sizes).
template <typename T>
inline void from_float(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    at::vec::convert(src, dst, n);
  }
}

// v rounded to T and widened back: the value that storing to T and reloading gives (round to
// nearest even, as c10's conversions), without the round trip through memory.
template <typename T>
inline Vec round_to(Vec v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
    __m512 out;
#else
    __m256 out;
#endif
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      at::vec::cvtbf16_fp32(at::vec::cvtfp32_bf16(v), out);
    } else {
      at::vec::cvtfp16_fp32(at::vec::cvtfp32_fp16(v), out);
    }
    return out;
#else
    float values[Vec::size()];
    v.store(values);
    for (int64_t i = 0; i < Vec::size(); ++i) values[i] = static_cast<float>(static_cast<T>(values[i]));
    return Vec::loadu(values);
#endif
  }
}

// dst[0, count) = v rounded to T (nearest even).
template <typename T>
inline void store_as(Vec v, T* dst, int64_t count = Vec::size()) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(dst, count);
  } else {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if (count == Vec::size()) {
      const auto bits = std::is_same_v<T, c10::BFloat16> ? at::vec::cvtfp32_bf16(v)
                                                         : at::vec::cvtfp32_fp16(v);
#if defined(CPU_CAPABILITY_AVX512)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), bits);
#else
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), bits);
#endif
      return;
    }
#endif
    float values[Vec::size()];
    v.store(values);
    for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<T>(values[i]);
  }
}

// max |x[i]| (NaN if any x[i] is NaN, as at::vec::maximum propagates it). Four independent
// maxima: at::vec::maximum's NaN test sits on the accumulator's dependency chain and made
// this reduction most of the time of the int8 quantizers.
inline float abs_max(const float* x, int64_t n) {
  constexpr int64_t w = Vec::size();
  int64_t i = 0;
  float amax = 0.0f;
  bool nan = false;
#if defined(CPU_CAPABILITY_AVX512)
  __m512 m0 = _mm512_setzero_ps(), m1 = m0, m2 = m0, m3 = m0;
  __mmask16 bad = 0;
  for (; i + 4 * w <= n; i += 4 * w) {
    const __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + w);
    const __m512 c = _mm512_loadu_ps(x + i + 2 * w), d = _mm512_loadu_ps(x + i + 3 * w);
    bad |= _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(c, d, _CMP_UNORD_Q);
    m0 = _mm512_max_ps(m0, _mm512_abs_ps(a));
    m1 = _mm512_max_ps(m1, _mm512_abs_ps(b));
    m2 = _mm512_max_ps(m2, _mm512_abs_ps(c));
    m3 = _mm512_max_ps(m3, _mm512_abs_ps(d));
  }
  for (; i + w <= n; i += w) {
    const __m512 a = _mm512_loadu_ps(x + i);
    bad |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    m0 = _mm512_max_ps(m0, _mm512_abs_ps(a));
  }
  amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
  nan = bad != 0;
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m0 = _mm256_setzero_ps(), m1 = m0, m2 = m0, m3 = m0, bad = m0;
  for (; i + 4 * w <= n; i += 4 * w) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + w);
    const __m256 c = _mm256_loadu_ps(x + i + 2 * w), d = _mm256_loadu_ps(x + i + 3 * w);
    bad = _mm256_or_ps(bad, _mm256_or_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q), _mm256_cmp_ps(c, d, _CMP_UNORD_Q)));
    m0 = _mm256_max_ps(m0, _mm256_andnot_ps(sign, a));
    m1 = _mm256_max_ps(m1, _mm256_andnot_ps(sign, b));
    m2 = _mm256_max_ps(m2, _mm256_andnot_ps(sign, c));
    m3 = _mm256_max_ps(m3, _mm256_andnot_ps(sign, d));
  }
  for (; i + w <= n; i += w) {
    const __m256 a = _mm256_loadu_ps(x + i);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    m0 = _mm256_max_ps(m0, _mm256_andnot_ps(sign, a));
  }
  const __m256 m = _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  amax = _mm_cvtss_f32(h);
  nan = _mm256_movemask_ps(bad) != 0;
#endif
  for (; i < n; ++i) {
    nan |= std::isnan(x[i]);
    amax = std::max(amax, std::abs(x[i]));
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : amax;
}

// Symmetric int8: codes in [-127, 127]; the smallest scale (2^-20, ops.quant.MIN_SCALE).
constexpr float kInt8Max = 127.0f;
constexpr float kMinScale = 1.0f / 1048576.0f;

// dst[i] = clamp(floor(x[i] op s + 0.5), -127, 127) as int8, op: * (kMultiply) or / (the
// KV cache's exact reference). One pass from float32 to the int8 codes.
template <bool kMultiply>
inline void quantize_store(const float* x, float s, int8_t* dst, int64_t n) {
  constexpr int64_t w = Vec::size();
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 vs = _mm512_set1_ps(s), half = _mm512_set1_ps(0.5f);
  const __m512 lo = _mm512_set1_ps(-kInt8Max), hi = _mm512_set1_ps(kInt8Max);
  for (; i + w <= n; i += w) {
    const __m512 a = _mm512_loadu_ps(x + i);
    __m512 q = _mm512_add_ps(kMultiply ? _mm512_mul_ps(a, vs) : _mm512_div_ps(a, vs), half);
    q = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(q)));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 vs = _mm256_set1_ps(s), half = _mm256_set1_ps(0.5f);
  const __m256 lo = _mm256_set1_ps(-kInt8Max), hi = _mm256_set1_ps(kInt8Max);
  for (; i + w <= n; i += w) {
    const __m256 a = _mm256_loadu_ps(x + i);
    __m256 q = _mm256_add_ps(kMultiply ? _mm256_mul_ps(a, vs) : _mm256_div_ps(a, vs), half);
    q = _mm256_min_ps(_mm256_max_ps(_mm256_floor_ps(q), lo), hi);
    const __m256i q32 = _mm256_cvtps_epi32(q);
    const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q32), _mm256_extracti128_si256(q32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + i), _mm_packs_epi16(q16, q16));
  }
#endif
  for (; i < n; ++i) {
    const float q = std::floor((kMultiply ? x[i] * s : x[i] / s) + 0.5f);
    dst[i] = static_cast<int8_t>(std::min(std::max(q, -kInt8Max), kInt8Max));
  }
}

inline float reduce_sum(Vec v) {
  return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, v);
}

// Σ a[i] b[i] in float32 (two vector accumulators, then the tail).
inline float dot(const float* a, const float* b, int64_t n) {
  constexpr int64_t w = Vec::size();
  Vec acc0(0.0f), acc1(0.0f);
  int64_t i = 0;
  for (; i + 2 * w <= n; i += 2 * w) {
    acc0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(a + i + w), Vec::loadu(b + i + w), acc1);
  }
  for (; i + w <= n; i += w) acc0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc0);
  float s = reduce_sum(acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += alpha * x.
inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  constexpr int64_t w = Vec::size();
  const Vec a(alpha);
  int64_t i = 0;
  for (; i + w <= n; i += w) at::vec::fmadd(a, Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// f(std::integral_constant<int, G>{}) for a GQA ratio of 1-8 query heads per kv head (their
// accumulators sized at compile time), G = 0 for any other (the caller's generic path).
template <typename F>
inline void with_gqa_ratio(int64_t groups, const F& f) {
  switch (groups) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

// x ← softmax(x), in place, float32 (vectorized exp: a scalar one cost more than the dot
// products of decode attention).
inline void softmax_inplace(float* x, int64_t n) {
  const float max = at::vec::reduce_all<float>(
      [](Vec a, Vec b) { return at::vec::maximum(a, b); }, x, n);
  const Vec vmax(max);
  at::vec::map([vmax](Vec v) { return (v - vmax).exp(); }, x, x, n);
  const float inv = 1.0f / at::vec::reduce_all<float>([](Vec a, Vec b) { return a + b; }, x, n);
  at::vec::map([inv](Vec v) { return v * Vec(inv); }, x, x, n);
}

}  // namespace headrace_cpu
