// Causal prefill attention over paged K/V (bf16, or int8 codes with scales) on AVX512-BF16
// (Zen 4, Cooper Lake): every chunk of a step attends to its sequence's cached tokens (prefix
// + itself), read in place from the pages, with the dot products on vdpbf16ps.
//
// Why: the torch path (ops/attention.py: one SDPA call per sequence, a gather and a masked
// SDPA after a cached prefix, a copy into the output) was ~13% of the mixed benchmark on a
// 2-core Zen 4, its flash kernel running at a third of the GEMMs' speed for 64-dim heads.
//
// Shape of the work: items of (sequence, kv head, kPos query positions); an item's rows are
// its positions × the kGroups query heads of the kv head (<= 12 rows: one score vector per
// row in registers). Keys go in blocks of 16 (one score vector), online softmax per block
// (FlashAttention-2), causal blocks skipped. Numerics as torch's bf16 SDPA: q·k exact products
// summed in float32, softmax in float32, probabilities rounded to bf16 for the value pass,
// float32 sums, the output rounded once. Every query's result depends only on its own keys,
// in the same order, whatever chunk it arrives in.
//
// The torch path it replaces is ops/attention.py `prefill_attention`;
// tests/kernels/test_cpu_prefill_attention.py compares the kernel with float32 causal attention
// over the same pages. Layouts as attention.cpp: token-minor key pages ([head_dim, block_size] per
// page and head, block_size % 16 == 0), token-major value pages.
#include <atomic>

#include "common.h"

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
#define HEADRACE_PREFILL_BF16 1
#endif

namespace headrace_cpu {
namespace {

#ifdef HEADRACE_PREFILL_BF16
using BF16 = c10::BFloat16;
constexpr int64_t kKeys = 16;    // keys per block: one score vector per row
constexpr int64_t kMaxDim = 256;  // head_dim bound of the per-block buffers

// One layer's pools (strides in elements). int8 pages carry one scale per (token, kv head)
// in scale pools whose tokens sit at unit stride (ops.kv_cache.allocate_kv_scales).
template <typename C, typename S>
struct Pools {
  const C* k;
  const C* v;
  int64_t k_block, k_head, k_dim;    // token-minor keys: tokens at unit stride
  int64_t v_block, v_head, v_token;  // token-major values: dims at unit stride
  int64_t block_size;
  const S* ks = nullptr;  // int8 only: key / value scales, [block][head][token]
  const S* vs = nullptr;
  int64_t s_block = 0, s_head = 0;
};

// Two float32 vectors of integers (int8 codes, exact in bf16) as bf16 pairs: lane t =
// (a[t], b[t]). An integer-valued float's bf16 is its top 16 bits.
inline __m512i pair_exact(__m512 a, __m512 b) {
  return _mm512_mask_blend_epi16(0xAAAAAAAAu, _mm512_srli_epi32(_mm512_castps_si512(a), 16),
                                 _mm512_castps_si512(b));
}

inline __m512 codes16(const int8_t* p, __mmask16 keep = 0xffff) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(keep, p)));
}

inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh&>(a), reinterpret_cast<__m512bh&>(b));
}

// kp[i]: lane t = (k[2i][t], k[2i + 1][t]) for the 16 keys at `col` (rows `stride` apart),
// the pairs vdpbf16ps multiplies by (q[2i], q[2i + 1]).
inline void key_pairs(const BF16* col, int64_t stride, int64_t half, __m512i* kp) {
  alignas(64) static constexpr int16_t kInterleave[32] = {
      0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i index = _mm512_load_si512(kInterleave);
  for (int64_t i = 0; i < half; ++i) {
    const BF16* row = col + 2 * i * stride;
    const __m256i d0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
    const __m256i d1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + stride));
    kp[i] = _mm512_permutexvar_epi16(index, _mm512_inserti64x4(_mm512_castsi256_si512(d0), d1, 1));
  }
}

// int8 codes: the same pairs, converted exactly (the key scales multiply the scores).
inline void key_pairs(const int8_t* col, int64_t stride, int64_t half, __m512i* kp) {
  for (int64_t i = 0; i < half; ++i) {
    const int8_t* row = col + 2 * i * stride;
    kp[i] = pair_exact(codes16(row), codes16(row + stride));
  }
}

// vp[(j * vecs + c)]: token pair j (tokens 2j, 2j + 1 of the block at `rows`) interleaved over
// the c-th 32-dim half-vector: unpacklo / unpackhi of 32 dims hold dims {0-3, 8-11, 16-19,
// 24-27} / {4-7, ...} (undone at the end). Tokens from `valid` on are zeros: a slot past the
// context may hold stale data (NaN times a zero probability is still NaN).
inline void value_pairs(const BF16* rows, int64_t stride, int64_t dim, int64_t valid, __m512i* vp) {
  const int64_t vecs = dim / 16;
  for (int64_t j = 0; j < kKeys / 2; ++j) {
    const BF16* r0 = rows + 2 * j * stride;
    const __mmask32 m0 = 2 * j < valid ? ~__mmask32{0} : __mmask32{0};
    const __mmask32 m1 = 2 * j + 1 < valid ? ~__mmask32{0} : __mmask32{0};
    for (int64_t z = 0; z < dim / 32; ++z) {
      const __m512i a = _mm512_maskz_loadu_epi16(m0, r0 + 32 * z);
      const __m512i b = _mm512_maskz_loadu_epi16(m1, r0 + stride + 32 * z);
      vp[j * vecs + 2 * z] = _mm512_unpacklo_epi16(a, b);
      vp[j * vecs + 2 * z + 1] = _mm512_unpackhi_epi16(a, b);
    }
  }
}

// int8 codes: lane d of vp[j * vecs + c] = (v[2j][16c + d], v[2j + 1][16c + d]), dims in
// natural order (the value scales multiply the probabilities).
inline void value_pairs(const int8_t* rows, int64_t stride, int64_t dim, int64_t valid, __m512i* vp) {
  const int64_t vecs = dim / 16;
  for (int64_t j = 0; j < kKeys / 2; ++j) {
    const int8_t* r0 = rows + 2 * j * stride;
    const __mmask16 m0 = 2 * j < valid ? 0xffff : 0, m1 = 2 * j + 1 < valid ? 0xffff : 0;
    for (int64_t c = 0; c < vecs; ++c) {
      vp[j * vecs + c] = pair_exact(codes16(r0 + 16 * c, m0), codes16(r0 + stride + 16 * c, m1));
    }
  }
}

// One item: query positions [p0, p0 + kPos) of a chunk (capped at `rows_pos`), at absolute
// positions prefix + p, × kGroups heads. q: the chunk's first query token; out likewise.
template <int kGroups, int kPos, typename C, typename S>
void attend_tile(const Pools<C, S>& pools, const int64_t* table, int64_t kv_head, int64_t prefix,
                 int64_t p0, int64_t rows_pos, const BF16* q, int64_t qs0, int64_t qs1, BF16* out,
                 int64_t os0, int64_t os1, int64_t dim, float scale) {
  constexpr int kRows = kGroups * kPos;
  constexpr bool kInt8 = std::is_same_v<C, int8_t>;
  const int64_t half = dim / 2, vecs = dim / 16;
  // Row r: position r / kGroups of the tile (rows past the chunk's end repeat its last
  // position, and are not written), query head r % kGroups of the kv head.
  int64_t pos[kRows];
  alignas(64) uint32_t qp[kRows][kMaxDim / 2];
  for (int r = 0; r < kRows; ++r) {
    pos[r] = std::min<int64_t>(p0 + r / kGroups, p0 + rows_pos - 1);
    std::memcpy(qp[r], q + pos[r] * qs0 + (kv_head * kGroups + r % kGroups) * qs1, dim * sizeof(BF16));
  }
  alignas(64) float acc[kRows][kMaxDim];
  alignas(64) uint32_t pp[kRows][kKeys / 2];
  __m512i kp[kMaxDim / 2], vp[kKeys / 2 * kMaxDim / 16];
  float m[kRows], alpha[kRows];
  __m512 l[kRows];
  for (int r = 0; r < kRows; ++r) {
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = _mm512_setzero_ps();
    std::fill_n(acc[r], dim, 0.0f);
  }
  const int64_t last_key = prefix + p0 + rows_pos - 1;  // the tile's last query sees 0..last_key
  const Vec vscale(scale), neg_inf(-std::numeric_limits<float>::infinity());
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t k0 = 0; k0 <= last_key; k0 += kKeys) {
    const int64_t page = table[k0 / pools.block_size], off = k0 % pools.block_size;
    key_pairs(pools.k + page * pools.k_block + kv_head * pools.k_head + off, pools.k_dim, half, kp);
    const int64_t valid = last_key + 1 - k0;  // keys of this block any row may see
    Vec kscale = vscale, vscale_k(1.0f);
    if constexpr (kInt8) {
      const int64_t at = page * pools.s_block + kv_head * pools.s_head + off;
      const __mmask16 live = valid >= kKeys ? 0xffff : static_cast<__mmask16>((1u << valid) - 1);
      kscale = Vec(_mm512_maskz_mov_ps(live, load_float(pools.ks + at))) * vscale;
      vscale_k = _mm512_maskz_mov_ps(live, load_float(pools.vs + at));
    }
    __m512 s[kRows];
    for (int r = 0; r < kRows; ++r) s[r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < half; ++i) {
      for (int r = 0; r < kRows; ++r) {
        s[r] = dot_pairs(s[r], kp[i], _mm512_set1_epi32(static_cast<int32_t>(qp[r][i])));
      }
    }
    for (int r = 0; r < kRows; ++r) {
      const int64_t qpos = prefix + pos[r];
      Vec x = Vec(s[r]) * kscale;
      if (k0 + kKeys - 1 > qpos) {  // the causal edge: keys past the query's position
        const __mmask16 past = _mm512_cmpgt_epi32_mask(
            _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(k0))),
            _mm512_set1_epi32(static_cast<int32_t>(qpos)));
        x = _mm512_mask_mov_ps(x, past, neg_inf);
      }
      // Block 0 always holds key 0, so m[r] is finite from the first block on, and a block
      // the row cannot see (all -inf) leaves m unchanged and adds zeros.
      const float m_new = std::max(m[r], _mm512_reduce_max_ps(x));
      const Vec p = (x - Vec(m_new)).exp_u20();
      alpha[r] = std::exp(m[r] - m_new);
      m[r] = m_new;
      l[r] = _mm512_fmadd_ps(l[r], _mm512_set1_ps(alpha[r]), p);
      const __m256bh packed = _mm512_cvtneps_pbh(kInt8 ? Vec(p * vscale_k) : p);
      std::memcpy(pp[r], &packed, sizeof(packed));
    }
    value_pairs(pools.v + page * pools.v_block + kv_head * pools.v_head + off * pools.v_token,
                pools.v_token, dim, valid, vp);
    for (int64_t c = 0; c < vecs; ++c) {
      __m512 a[kRows];
      for (int r = 0; r < kRows; ++r) a[r] = _mm512_mul_ps(_mm512_load_ps(acc[r] + 16 * c), _mm512_set1_ps(alpha[r]));
      for (int64_t j = 0; j < kKeys / 2; ++j) {
        for (int r = 0; r < kRows; ++r) {
          a[r] = dot_pairs(a[r], vp[j * vecs + c], _mm512_set1_epi32(static_cast<int32_t>(pp[r][j])));
        }
      }
      for (int r = 0; r < kRows; ++r) _mm512_store_ps(acc[r] + 16 * c, a[r]);
    }
  }
  // bf16 pages: acc holds each 32 dims as (unpacklo: 0-3, 8-11, 16-19, 24-27 | unpackhi: the
  // rest); int8 pages: in order.
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29,
                                           30, 31);
  alignas(64) float row[kMaxDim];
  for (int r = 0; r < kRows; ++r) {
    if (r / kGroups >= rows_pos) break;  // the rows past a chunk's end were padding
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(l[r]));
    for (int64_t z = 0; z < dim / 32; ++z) {
      const __m512 lo = _mm512_load_ps(acc[r] + 32 * z), hi = _mm512_load_ps(acc[r] + 32 * z + 16);
      if constexpr (kInt8) {
        _mm512_store_ps(row + 32 * z, _mm512_mul_ps(lo, inv));
        _mm512_store_ps(row + 32 * z + 16, _mm512_mul_ps(hi, inv));
      } else {
        _mm512_store_ps(row + 32 * z, _mm512_mul_ps(_mm512_permutex2var_ps(lo, first, hi), inv));
        _mm512_store_ps(row + 32 * z + 16, _mm512_mul_ps(_mm512_permutex2var_ps(lo, second, hi), inv));
      }
    }
    from_float(row, out + pos[r] * os0 + (kv_head * kGroups + r % kGroups) * os1, dim);
  }
}

template <int kGroups, typename C, typename S>
void run_prefill(const at::Tensor& query, const Pools<C, S>& pools, const int64_t* tables, int64_t width,
                 const int64_t* cu, const int64_t* ctx, int64_t num_seqs, int64_t kv_heads,
                 float scale, at::Tensor& out) {
  constexpr int kPos = std::max(1, 12 / kGroups);
  const int64_t dim = query.size(2);
  // Items (sequence, kv head, tile), numbered in that order.
  std::vector<int64_t> first_item(num_seqs + 1, 0);
  for (int64_t i = 0; i < num_seqs; ++i) {
    const int64_t tiles = (cu[i + 1] - cu[i] + kPos - 1) / kPos;
    first_item[i + 1] = first_item[i] + tiles * kv_heads;
  }
  const int64_t items = first_item[num_seqs];
  const BF16* q = query.data_ptr<BF16>();
  BF16* o = out.data_ptr<BF16>();
  const int64_t qs0 = query.stride(0), qs1 = query.stride(1), os0 = out.stride(0), os1 = out.stride(1);
  // Handed out one at a time: an item's cost grows with its position (the causal triangle).
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), items), 1, [&](int64_t, int64_t) {
    int64_t seq = 0;
    for (int64_t it = next++; it < items; it = next++) {
      while (first_item[seq + 1] <= it) ++seq;
      const int64_t local = it - first_item[seq];
      const int64_t tiles = (first_item[seq + 1] - first_item[seq]) / kv_heads;
      const int64_t kv_head = local / tiles, p0 = (local % tiles) * kPos;
      const int64_t chunk = cu[seq + 1] - cu[seq];
      attend_tile<kGroups, kPos>(pools, tables + seq * width, kv_head, ctx[seq] - chunk, p0,
                                 std::min<int64_t>(kPos, chunk - p0), q + cu[seq] * qs0, qs0, qs1,
                                 o + cu[seq] * os0, os0, os1, dim, scale);
    }
  });
}
#endif

bool has_bf16_prefill_attention() {
#ifdef HEADRACE_PREFILL_BF16
  return true;
#else
  return false;
#endif
}

#ifdef HEADRACE_PREFILL_BF16
template <typename C, typename S>
void dispatch_groups(const at::Tensor& query, const Pools<C, S>& pools, const at::Tensor& tables,
                     const at::Tensor& cu, const at::Tensor& ctx, int64_t kv_heads, double scale,
                     at::Tensor& out) {
  // The caller checked 1-8 query heads per kv head: no generic path (G = 0) here.
  with_gqa_ratio(query.size(1) / kv_heads, [&](auto groups_tag) {
    constexpr int kGroups = decltype(groups_tag)::value;
    if constexpr (kGroups > 0) {
      run_prefill<kGroups>(query, pools, tables.data_ptr<int64_t>(), tables.size(1),
                           cu.data_ptr<int64_t>(), ctx.data_ptr<int64_t>(), ctx.size(0), kv_heads,
                           static_cast<float>(scale), out);
    }
  });
}
#endif

// query: [T, H, D] bf16 (the chunks of a step, back to back); pools: [num_blocks, block_size,
// KVH, D], bf16 or int8 codes (with scale pools [num_blocks, block_size, KVH], tokens at unit
// stride), keys token-minor; cu_seqlens: [S + 1]; context_lens: [S] (prefix + chunk);
// block_tables: [S, max_blocks]. Returns [T, H, D] bf16.
at::Tensor paged_prefill_attention(const at::Tensor& query, const at::Tensor& key_cache,
                                   const at::Tensor& value_cache, const at::Tensor& block_tables,
                                   const at::Tensor& cu_seqlens, const at::Tensor& context_lens,
                                   double scale, const std::optional<at::Tensor>& key_scale,
                                   const std::optional<at::Tensor>& value_scale) {
  TORCH_CHECK(has_bf16_prefill_attention(), "paged_prefill_attention needs AVX512-BF16");
#ifdef HEADRACE_PREFILL_BF16
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1 && query.scalar_type() == at::kBFloat16,
              "query: [T, H, D] bf16 with a unit last stride");
  TORCH_CHECK(key_cache.stride(1) == 1 && value_cache.stride(3) == 1,
              "keys token-minor, values token-major");
  const int64_t dim = query.size(2), kv_heads = key_cache.size(2), groups = query.size(1) / kv_heads;
  const int64_t block_size = key_cache.size(1);
  TORCH_CHECK(dim % 32 == 0 && dim <= kMaxDim && block_size % kKeys == 0);
  TORCH_CHECK(query.size(1) % kv_heads == 0 && groups >= 1 && groups <= 8, "1-8 query heads per kv head");
  const at::Tensor tables = block_tables.to(at::kLong).contiguous();
  const at::Tensor cu = cu_seqlens.to(at::kLong).contiguous();
  const at::Tensor ctx = context_lens.to(at::kLong).contiguous();
  TORCH_CHECK(cu.size(0) == ctx.size(0) + 1 && tables.size(0) == ctx.size(0));
  at::Tensor out = at::empty_like(query, at::MemoryFormat::Contiguous);
  if (query.size(0) == 0) return out;
  const int64_t kb = key_cache.stride(0), kh = key_cache.stride(2), kd = key_cache.stride(3);
  const int64_t vb = value_cache.stride(0), vh = value_cache.stride(2), vt = value_cache.stride(1);
  if (key_cache.scalar_type() == at::kChar) {
    TORCH_CHECK(value_cache.scalar_type() == at::kChar && key_scale && value_scale,
                "int8 pages need scale pools");
    TORCH_CHECK(key_scale->strides() == value_scale->strides() && key_scale->stride(1) == 1,
                "scale pools: tokens at unit stride, keys and values alike");
    HEADRACE_DISPATCH_FLOAT(key_scale->scalar_type(), "prefill_int8", [&] {
      Pools<int8_t, scalar_t> pools{key_cache.data_ptr<int8_t>(), value_cache.data_ptr<int8_t>(),
                                    kb, kh, kd, vb, vh, vt, block_size};
      pools.ks = key_scale->data_ptr<scalar_t>();
      pools.vs = value_scale->data_ptr<scalar_t>();
      pools.s_block = key_scale->stride(0);
      pools.s_head = key_scale->stride(2);
      dispatch_groups(query, pools, tables, cu, ctx, kv_heads, scale, out);
    });
    return out;
  }
  TORCH_CHECK(key_cache.scalar_type() == at::kBFloat16 && value_cache.scalar_type() == at::kBFloat16,
              "pages: bf16, or int8 with scale pools");
  const Pools<BF16, float> pools{key_cache.data_ptr<BF16>(), value_cache.data_ptr<BF16>(),
                                 kb, kh, kd, vb, vh, vt, block_size};
  dispatch_groups(query, pools, tables, cu, ctx, kv_heads, scale, out);
  return out;
#else
  return query;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(headrace_cpu, m) {
  m.def("has_bf16_prefill_attention() -> bool");
  m.def(
      "paged_prefill_attention(Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_tables, Tensor cu_seqlens, Tensor context_lens, float scale, "
      "Tensor? key_scale=None, Tensor? value_scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(headrace_cpu, CPU, m) {
  m.impl("paged_prefill_attention", &paged_prefill_attention);
}

TORCH_LIBRARY_IMPL(headrace_cpu, CatchAll, m) {
  m.impl("has_bf16_prefill_attention", &has_bf16_prefill_attention);
}

}  // namespace headrace_cpu
