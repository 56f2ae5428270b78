// Paged KV cache kernels for the CPU: write new K/V into the pages (quantizing for an int8
// cache) and one-query-per-sequence decode attention that reads the pages in place.
//
// The torch references are ops/attention.py and ops/kv_cache.py; tests/kernels/test_cpu_kernels.py
// compares them. Layouts (all addressed through strides, so head-major pools work as-is):
//   key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim] (model dtype or int8)
//   key_scale, value_scale: [num_blocks, block_size, num_kv_heads] (int8 caches only)
#include "common.h"

#include <atomic>
#include <numeric>

namespace headrace_cpu {
namespace {

struct PoolView {
  char* data;
  int64_t block_stride, token_stride, head_stride;  // in elements
  int64_t block_size;
};

PoolView pool_view(const at::Tensor& pool) {
  TORCH_CHECK(pool.dim() >= 3, "a KV pool is [num_blocks, block_size, num_kv_heads, ...]");
  if (pool.dim() == 4) {
    TORCH_CHECK(pool.stride(3) == 1 || pool.stride(1) == 1,
                "KV pages need a unit stride along head_dim (token-major) or tokens (token-minor)");
  }
  return {static_cast<char*>(pool.data_ptr()), pool.stride(0), pool.stride(1), pool.stride(2),
          pool.size(1)};
}

template <typename T>
inline T* row_ptr(const PoolView& v, int64_t block, int64_t offset, int64_t head) {
  return reinterpret_cast<T*>(v.data) + block * v.block_stride + offset * v.token_stride +
         head * v.head_stride;
}

// ---- reshape_and_cache ------------------------------------------------------------------

// dst[d * stride] = src[d]: a row into a token-major page (stride 1) or a token-minor one.
template <typename T>
inline void put_row(T* dst, int64_t stride, const T* src, int64_t dim) {
  if (stride == 1) {
    std::memcpy(dst, src, dim * sizeof(T));
  } else {
    for (int64_t d = 0; d < dim; ++d) dst[d * stride] = src[d];
  }
}

template <typename T>
void cache_rows(const at::Tensor& x, const at::Tensor& cache, const int64_t* slots,
                int64_t num_tokens) {
  const int64_t heads = x.size(1), dim = x.size(2);
  const PoolView pool = pool_view(cache);
  const int64_t dim_stride = cache.stride(3);
  const T* src = x.data_ptr<T>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0) continue;  // a padding token
      for (int64_t h = 0; h < heads; ++h) {
        T* dst = row_ptr<T>(pool, slot / pool.block_size, slot % pool.block_size, h);
        put_row(dst, dim_stride, src + t * s0 + h * s1, dim);
      }
    }
  });
}

// int8 cache: one symmetric scale per (token, kv head), rounded to the scale pool's dtype
// before the codes are computed (ops.kv_cache.quantize_kv), codes = floor(x / scale + 0.5).
template <typename T, typename S>
void cache_rows_int8(const at::Tensor& x, const at::Tensor& cache, const at::Tensor& scales,
                     const int64_t* slots, int64_t num_tokens) {
  const int64_t heads = x.size(1), dim = x.size(2);
  const PoolView pool = pool_view(cache);
  const int64_t dim_stride = cache.stride(3);
  const PoolView scale_pool = pool_view(scales);
  const T* src = x.data_ptr<T>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(dim);
    std::vector<int8_t> codes(dim);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0) continue;
      const int64_t block = slot / pool.block_size, offset = slot % pool.block_size;
      for (int64_t h = 0; h < heads; ++h) {
        float* r = row.data();
        to_float(src + t * s0 + h * s1, r, dim);
        const S stored = static_cast<S>(std::max(abs_max(r, dim) / kInt8Max, kMinScale));
        const float scale = static_cast<float>(stored);
        *row_ptr<S>(scale_pool, block, offset, h) = stored;
        int8_t* dst = row_ptr<int8_t>(pool, block, offset, h);
        if (dim_stride == 1) {
          quantize_store<false>(r, scale, dst, dim);
        } else {  // token-minor key page
          quantize_store<false>(r, scale, codes.data(), dim);
          for (int64_t d = 0; d < dim; ++d) dst[d * dim_stride] = codes[d];
        }
      }
    }
  });
}

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                       at::Tensor& value_cache, const at::Tensor& slot_mapping,
                       const std::optional<at::Tensor>& key_scale,
                       const std::optional<at::Tensor>& value_scale) {
  TORCH_CHECK(key.dim() == 3 && value.dim() == 3, "key, value: [T, KVH, D]");
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1, "key, value need a unit last stride");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous());
  const at::Tensor slots_t = slot_mapping;
  const int64_t* slots = slots_t.data_ptr<int64_t>();
  const int64_t n = slot_mapping.size(0);
  if (key_cache.scalar_type() == at::kChar) {
    TORCH_CHECK(key_scale.has_value() && value_scale.has_value(), "int8 caches need scale pools");
    HEADRACE_DISPATCH_FLOAT(key.scalar_type(), "reshape_and_cache_int8", [&] {
      using T = scalar_t;
      HEADRACE_DISPATCH_FLOAT(key_scale->scalar_type(), "scale", [&] {
        cache_rows_int8<T, scalar_t>(key, key_cache, *key_scale, slots, n);
        cache_rows_int8<T, scalar_t>(value, value_cache, *value_scale, slots, n);
      });
    });
    return;
  }
  TORCH_CHECK(key_cache.scalar_type() == key.scalar_type(), "cache and K/V dtypes differ");
  HEADRACE_DISPATCH_FLOAT(key.scalar_type(), "reshape_and_cache", [&] {
    cache_rows<scalar_t>(key, key_cache, slots, n);
    cache_rows<scalar_t>(value, value_cache, slots, n);
  });
}

// ---- paged decode attention ---------------------------------------------------------------
//
// One (sequence, kv head) at a time, for the `groups` query heads that share it; two passes
// over its pages (scores, then values), the scores of the whole context in a float32 buffer.
// Key pages may be token-minor ([head_dim, block_size] per page and head: what ModelRunner
// allocates on CPUs that run these kernels): a page's scores are then `head_dim` vector FMAs
// across its tokens per query head, with no horizontal sums. Token-major keys take one dot
// product per token. Value pages are token-major.

struct DecodeScratch {
  std::vector<float> q, scores, page, scales;
};

// The n scales of one page and kv head (int8 caches), widened to float32 a vector at a time:
// a software float16 conversion per token cost more than the page's dot products. Whole
// vectors of a head-major pool load directly: gathered through `raw`, GCC copied them with a
// `rep movs`, 40% of the int8 decode kernel's own time outside its FMA loops (perf).
template <typename S>
inline void page_scales(const PoolView& v, int64_t block, int64_t head, int64_t n, float* out,
                        int64_t offset = 0) {
  constexpr int64_t w = Vec::size();
  const S* p = row_ptr<S>(v, block, offset, head);
  for (int64_t t0 = 0; t0 < n; t0 += w) {
    if (v.token_stride == 1 && n - t0 >= w) {  // contiguous (head-major pools): one load
      load_float(p + t0).store(out + t0);
      continue;
    }
    S raw[w];
    const int64_t count = std::min(w, n - t0);
    for (int64_t j = 0; j < count; ++j) raw[j] = p[(t0 + j) * v.token_stride];
    for (int64_t j = count; j < w; ++j) raw[j] = S(0.0f);
    load_float(raw).store(out + t0);
  }
}

template <typename T, typename C, typename S>
struct DecodeArgs {
  const PoolView kp, vp;
  const PoolView* ksp;  // scale pools (int8 caches), else null
  const PoolView* vsp;
  int64_t k_dim_stride, groups, dim;
  float scale;
};

// scores[g * ctx + pos] = q_g · k_pos (times the key's scale for int8), for one page.
// kGroups > 0: the number of query heads per kv head, known at compile time (accumulators in
// registers); 0: any number (the generic path).
template <int kGroups, typename T, typename C, typename S>
inline void page_scores(const DecodeArgs<T, C, S>& a, const float* q, int64_t block,
                        int64_t kv_head, int64_t pos0, int64_t n, int64_t ctx, float* scores,
                        float* tmp, float* ks) {
  constexpr bool kInt8 = std::is_same_v<C, int8_t>;
  if constexpr (kInt8) page_scales<S>(*a.ksp, block, kv_head, n, ks);
  const C* page = row_ptr<C>(a.kp, block, 0, kv_head);
  constexpr int64_t w = Vec::size();
  const int64_t groups = kGroups > 0 ? kGroups : a.groups;
  if (a.kp.token_stride == 1 && kGroups > 0) {
    // Token-minor page: row d holds the d-th value of every token; one widened row feeds
    // every query head.
    for (int64_t t0 = 0; t0 < n; t0 += w) {
      Vec acc[kGroups > 0 ? kGroups : 1];
      for (int g = 0; g < kGroups; ++g) acc[g] = Vec(0.0f);
      const C* col = page + t0;
      for (int64_t d = 0; d < a.dim; ++d) {
        const Vec kv = load_float(col + d * a.k_dim_stride);
        for (int g = 0; g < kGroups; ++g) acc[g] = at::vec::fmadd(Vec(q[g * a.dim + d]), kv, acc[g]);
      }
      const int64_t count = std::min<int64_t>(w, n - t0);
      if constexpr (kInt8) {
        const Vec scale = Vec::loadu(ks + t0);
        for (int g = 0; g < kGroups; ++g) acc[g] = acc[g] * scale;
      }
      for (int g = 0; g < kGroups; ++g) acc[g].store(scores + g * ctx + pos0 + t0, count);
    }
    return;
  } else if (a.kp.token_stride == 1) {
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t d = 0; d < a.dim; ++d) tmp[d] = static_cast<float>(page[d * a.k_dim_stride + t]);
      for (int64_t g = 0; g < groups; ++g) scores[g * ctx + pos0 + t] = dot(q + g * a.dim, tmp, a.dim);
    }
  } else {
    for (int64_t t = 0; t < n; ++t) {
      to_float(page + t * a.kp.token_stride, tmp, a.dim);
      for (int64_t g = 0; g < groups; ++g) scores[g * ctx + pos0 + t] = dot(q + g * a.dim, tmp, a.dim);
    }
  }
  if constexpr (kInt8) {
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t g = 0; g < groups; ++g) scores[g * ctx + pos0 + t] *= ks[t];
    }
  }
}

// acc[g] += Σ_t p[g][t] v_t for one page (int8: p times the value's scale).
template <int kGroups, typename T, typename C, typename S>
inline void page_values(const DecodeArgs<T, C, S>& a, const float* probs, int64_t block,
                        int64_t kv_head, int64_t pos0, int64_t n, int64_t ctx, float* tmp,
                        float* acc, float* vs) {
  const C* page = row_ptr<C>(a.vp, block, 0, kv_head);
  constexpr int64_t w = Vec::size();
  const int64_t groups = kGroups > 0 ? kGroups : a.groups;
  const int64_t ts = a.vp.token_stride;
  // This page's weights, [groups][n] (tmp).
  if constexpr (std::is_same_v<C, int8_t>) {
    page_scales<S>(*a.vsp, block, kv_head, n, vs);
    for (int64_t g = 0; g < groups; ++g) {
      at::vec::map2([](Vec p, Vec v) { return p * v; }, tmp + g * n, probs + g * ctx + pos0, vs, n);
    }
  } else {
    for (int64_t g = 0; g < groups; ++g) std::copy_n(probs + g * ctx + pos0, n, tmp + g * n);
  }
  if constexpr (kGroups > 0) {
    if (a.dim % w == 0) {
      for (int64_t d0 = 0; d0 < a.dim; d0 += w) {
        Vec sum[kGroups];
        for (int g = 0; g < kGroups; ++g) sum[g] = Vec::loadu(acc + g * a.dim + d0);
        for (int64_t t = 0; t < n; ++t) {
          const Vec v = load_float(page + t * ts + d0);
          for (int g = 0; g < kGroups; ++g) sum[g] = at::vec::fmadd(Vec(tmp[g * n + t]), v, sum[g]);
        }
        for (int g = 0; g < kGroups; ++g) sum[g].store(acc + g * a.dim + d0);
      }
      return;
    }
  }
  std::vector<float> row(a.dim);
  for (int64_t t = 0; t < n; ++t) {
    to_float(page + t * ts, row.data(), a.dim);
    for (int64_t g = 0; g < groups; ++g) axpy(tmp[g * n + t], row.data(), acc + g * a.dim, a.dim);
  }
}

// Pages sit at unrelated addresses, so no hardware prefetcher follows a sequence from one
// page to the next: the next page is requested while this one is computed.
inline void prefetch_page(const void* page, int64_t bytes) {
  const char* p = static_cast<const char*>(page);
  for (int64_t line = 0; line < bytes; line += 64) __builtin_prefetch(p + line);
}

// ---- register-blocked path: token-minor keys, a compile-time GQA ratio, dim % W == 0 ----
//
// Scores: kSlices slices of W tokens at once, each key row widened once and multiplied into
// kGroups x kSlices accumulators (a query value broadcast once per d feeds kSlices FMAs).
// Values: for each token, kGroups probabilities broadcast once feed kGroups x kVecs FMAs over
// kVecs vectors of head_dim. Both keep ~12 accumulators in registers; the per-page loops
// they replace issued ~3 loads/conversions per FMA.

template <int kGroups>
constexpr int kBlocked = kGroups <= 3 ? 4 : (kGroups <= 6 ? 2 : 1);

template <int kGroups, int kSlices, typename T, typename C, typename S>
inline void score_slices(const DecodeArgs<T, C, S>& a, const float* q, const int64_t* table,
                         int64_t pos0, int64_t ctx, int64_t kv_head, float* scores, float* ks) {
  constexpr int64_t w = Vec::size();
  const int64_t bs = a.kp.block_size;
  const C* col[kSlices];
  for (int p = 0; p < kSlices; ++p) {
    const int64_t pos = pos0 + p * w;
    col[p] = row_ptr<C>(a.kp, table[pos / bs], 0, kv_head) + pos % bs;
  }
  Vec acc[kGroups][kSlices];
  for (int g = 0; g < kGroups; ++g)
    for (int p = 0; p < kSlices; ++p) acc[g][p] = Vec(0.0f);
  for (int64_t d = 0; d < a.dim; ++d) {
    Vec kv[kSlices];
    for (int p = 0; p < kSlices; ++p) kv[p] = load_float(col[p] + d * a.k_dim_stride);
    for (int g = 0; g < kGroups; ++g) {
      const Vec qd(q[g * a.dim + d]);
      for (int p = 0; p < kSlices; ++p) acc[g][p] = at::vec::fmadd(qd, kv[p], acc[g][p]);
    }
  }
  for (int p = 0; p < kSlices; ++p) {
    const int64_t pos = pos0 + p * w, count = std::min(w, ctx - pos);
    if constexpr (std::is_same_v<C, int8_t>) {
      page_scales<S>(*a.ksp, table[pos / bs], kv_head, count, ks, pos % bs);
      const Vec scale = Vec::loadu(ks);
      for (int g = 0; g < kGroups; ++g) acc[g][p] = acc[g][p] * scale;
    }
    for (int g = 0; g < kGroups; ++g) acc[g][p].store(scores + g * ctx + pos, count);
  }
}

template <int kGroups, int kVecs, typename T, typename C, typename S>
inline void value_block(const DecodeArgs<T, C, S>& a, const float* probs, const int64_t* table,
                        int64_t ctx, int64_t kv_head, int64_t d0, float* out) {
  constexpr int64_t w = Vec::size();
  const int64_t bs = a.vp.block_size, ts = a.vp.token_stride;
  const int64_t page_bytes = bs * ts * static_cast<int64_t>(sizeof(C));
  const int64_t last = (ctx - 1) / bs;
  Vec acc[kGroups][kVecs];
  for (int g = 0; g < kGroups; ++g)
    for (int c = 0; c < kVecs; ++c) acc[g][c] = Vec(0.0f);
  // One loop over the tokens (a nested page/token loop made GCC keep the accumulators on the
  // stack, storing all of them after every token).
  const C* page = nullptr;
  for (int64_t pos = 0, t = bs, index = -1; pos < ctx; ++pos, ++t) {
    if (t == bs) {  // the next page (a counter, not pos % bs: a division per token showed)
      t = 0;
      ++index;
      prefetch_page(row_ptr<C>(a.vp, table[std::min(index + 1, last)], 0, kv_head), page_bytes);
      page = row_ptr<C>(a.vp, table[index], 0, kv_head) + d0;
    }
    Vec v[kVecs];
    for (int c = 0; c < kVecs; ++c) v[c] = load_float(page + t * ts + c * w);
    for (int g = 0; g < kGroups; ++g) {
      const Vec pt(probs[g * ctx + pos]);
      for (int c = 0; c < kVecs; ++c) acc[g][c] = at::vec::fmadd(pt, v[c], acc[g][c]);
    }
  }
  for (int g = 0; g < kGroups; ++g)
    for (int c = 0; c < kVecs; ++c) acc[g][c].store(out + g * a.dim + d0 + c * w);
}

template <int kGroups, typename T, typename C, typename S>
void attend_blocked(const DecodeArgs<T, C, S>& a, int64_t ctx, const int64_t* table,
                    int64_t kv_head, DecodeScratch& s) {
  constexpr int64_t w = Vec::size();
  constexpr int kSlices = kBlocked<kGroups>;
  const int64_t bs = a.kp.block_size;
  const int64_t page_bytes = bs * a.dim * static_cast<int64_t>(sizeof(C));
  const int64_t v_page_bytes = bs * a.vp.token_stride * static_cast<int64_t>(sizeof(C));
  const int64_t slices = (ctx + w - 1) / w, last = (ctx - 1) / bs;
  float* scores = s.scores.data();
  for (int64_t pg = 0; pg <= std::min((kSlices * w - 1) / bs, last); ++pg) {
    prefetch_page(row_ptr<C>(a.vp, table[pg], 0, kv_head), v_page_bytes);
  }
  int64_t j = 0;
  for (; j + kSlices <= slices; j += kSlices) {
    // The next group's pages (pages sit at unrelated addresses: no hardware prefetch).
    // Their value pages too: the value pass then reads from the caches, and the loads of the
    // two passes overlap the score FMAs instead of stalling the value pass.
    for (int64_t pg = ((j + kSlices) * w) / bs; pg <= std::min(((j + 2 * kSlices) * w - 1) / bs, last); ++pg) {
      prefetch_page(row_ptr<C>(a.kp, table[pg], 0, kv_head), page_bytes);
      prefetch_page(row_ptr<C>(a.vp, table[pg], 0, kv_head), v_page_bytes);
    }
    score_slices<kGroups, kSlices>(a, s.q.data(), table, j * w, ctx, kv_head, scores,
                                   s.scales.data());
  }
  for (; j < slices; ++j) {
    score_slices<kGroups, 1>(a, s.q.data(), table, j * w, ctx, kv_head, scores, s.scales.data());
  }
  for (int g = 0; g < kGroups; ++g) softmax_inplace(scores + g * ctx, ctx);
  if constexpr (std::is_same_v<C, int8_t>) {  // fold each value's scale into its weight
    for (int64_t pos0 = 0; pos0 < ctx; pos0 += bs) {
      const int64_t n = std::min(bs, ctx - pos0);
      page_scales<S>(*a.vsp, table[pos0 / bs], kv_head, n, s.scales.data());
      for (int g = 0; g < kGroups; ++g) {
        float* p = scores + g * ctx + pos0;
        at::vec::map2([](Vec x, Vec y) { return x * y; }, p, p, s.scales.data(), n);
      }
    }
  }
  // The query buffer is free again: it receives the output.
  int64_t d0 = 0;
  constexpr int kVecs = kBlocked<kGroups>;
  for (; d0 + kVecs * w <= a.dim; d0 += kVecs * w) {
    value_block<kGroups, kVecs>(a, scores, table, ctx, kv_head, d0, s.q.data());
  }
  for (; d0 < a.dim; d0 += w) value_block<kGroups, 1>(a, scores, table, ctx, kv_head, d0, s.q.data());
}

template <int kGroups, typename T, typename C, typename S>
void attend_one(const DecodeArgs<T, C, S>& a, const T* q, int64_t q_head_stride, T* out,
                int64_t out_head_stride, const int64_t* table, int64_t ctx, int64_t kv_head,
                DecodeScratch& s) {
  const int64_t bs = a.kp.block_size, groups = a.groups, dim = a.dim;
  s.q.resize(groups * dim);
  for (int64_t g = 0; g < groups; ++g) {
    to_float(q + g * q_head_stride, s.q.data() + g * dim, dim);
    for (int64_t d = 0; d < dim; ++d) s.q[g * dim + d] *= a.scale;
  }
  s.scores.resize(groups * ctx);
  s.page.resize(std::max<int64_t>(dim, groups * bs) + Vec::size());
  s.scales.resize(bs + Vec::size());
  if constexpr (kGroups > 0) {
    if (a.kp.token_stride == 1 && dim % Vec::size() == 0) {
      attend_blocked<kGroups>(a, ctx, table, kv_head, s);
      for (int64_t g = 0; g < groups; ++g) from_float(s.q.data() + g * dim, out + g * out_head_stride, dim);
      return;
    }
  }
  const int64_t page_bytes = bs * dim * static_cast<int64_t>(sizeof(C));
  const int64_t last = (ctx - 1) / bs;
  for (int64_t pos0 = 0; pos0 < ctx; pos0 += bs) {
    const int64_t next = std::min(pos0 / bs + 1, last);
    prefetch_page(row_ptr<C>(a.kp, table[next], 0, kv_head), page_bytes);
    page_scores<kGroups>(a, s.q.data(), table[pos0 / bs], kv_head, pos0, std::min(bs, ctx - pos0), ctx,
                s.scores.data(), s.page.data(), s.scales.data());
  }
  for (int64_t g = 0; g < groups; ++g) softmax_inplace(s.scores.data() + g * ctx, ctx);
  // The query buffer is free again: it accumulates the output now.
  std::fill(s.q.begin(), s.q.end(), 0.0f);
  prefetch_page(row_ptr<C>(a.vp, table[0], 0, kv_head), page_bytes);
  for (int64_t pos0 = 0; pos0 < ctx; pos0 += bs) {
    const int64_t next = std::min(pos0 / bs + 1, last);
    prefetch_page(row_ptr<C>(a.vp, table[next], 0, kv_head), page_bytes);
    page_values<kGroups>(a, s.scores.data(), table[pos0 / bs], kv_head, pos0, std::min(bs, ctx - pos0),
                ctx, s.page.data(), s.q.data(), s.scales.data());
  }
  for (int64_t g = 0; g < groups; ++g) from_float(s.q.data() + g * dim, out + g * out_head_stride, dim);
}

template <typename T, typename C, typename S>
void decode_attention(const at::Tensor& query, const at::Tensor& key_cache,
                      const at::Tensor& value_cache, const at::Tensor* key_scale,
                      const at::Tensor* value_scale, const at::Tensor& block_tables,
                      const at::Tensor& context_lens, double scale, at::Tensor& out) {
  const int64_t num_seqs = query.size(0), num_heads = query.size(1), dim = query.size(2);
  const int64_t kv_heads = key_cache.size(2), groups = num_heads / kv_heads;
  TORCH_CHECK(value_cache.stride(3) == 1, "value pages must be token-major");
  PoolView ksp{}, vsp{};
  if (key_scale != nullptr) {
    ksp = pool_view(*key_scale);
    vsp = pool_view(*value_scale);
  }
  const DecodeArgs<T, C, S> args{pool_view(key_cache), pool_view(value_cache),
                                 key_scale ? &ksp : nullptr, value_scale ? &vsp : nullptr,
                                 key_cache.stride(3), groups, dim, static_cast<float>(scale)};
  TORCH_CHECK(args.kp.token_stride != 1 || args.kp.block_size % Vec::size() == 0,
              "token-minor key pages need a block size that is a multiple of ", Vec::size());
  const at::Tensor tables = block_tables.to(at::kLong).contiguous();
  const at::Tensor lens = context_lens.to(at::kLong).contiguous();
  const int64_t* tab = tables.data_ptr<int64_t>();
  const int64_t* len = lens.data_ptr<int64_t>();
  const int64_t width = tables.size(1);
  const T* q = query.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const int64_t qs0 = query.stride(0), qs1 = query.stride(1);
  const int64_t os0 = out.stride(0), os1 = out.stride(1);
  // Items (sequence, kv head) handed out one at a time, longest context first: an item costs
  // its context length, and the runner sorts a step's decodes by it, so a static split gave
  // one thread the long half (32 sequences of 40-760 tokens, bf16, 2 threads: 565-697 ->
  // 436-482 us a layer, alternating processes).
  std::vector<int64_t> order(num_seqs);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return len[a] > len[b]; });
  const int64_t items = num_seqs * kv_heads;
  auto run = [&](auto groups_tag) {
    constexpr int kGroups = decltype(groups_tag)::value;
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), items), 1, [&](int64_t, int64_t) {
      DecodeScratch scratch;
      for (int64_t i = next++; i < items; i = next++) {
        const int64_t seq = order[i / kv_heads], kv_head = i % kv_heads;
        const int64_t first = kv_head * groups;
        attend_one<kGroups, T, C, S>(args, q + seq * qs0 + first * qs1, qs1,
                                     o + seq * os0 + first * os1, os1, tab + seq * width,
                                     len[seq], kv_head, scratch);
      }
    });
  };
  // The usual GQA ratios get accumulators in registers; any other takes the generic path.
  with_gqa_ratio(groups, run);
}

at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& key_cache,
                                  const at::Tensor& value_cache, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, double scale,
                                  const std::optional<at::Tensor>& key_scale,
                                  const std::optional<at::Tensor>& value_scale) {
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1, "query: [S, H, D] with a unit last stride");
  TORCH_CHECK(query.size(1) % key_cache.size(2) == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(key_cache.size(3) == query.size(2), "head_dim of query and cache differ");
  at::Tensor out = at::empty_like(query, at::MemoryFormat::Contiguous);
  if (query.size(0) == 0) return out;
  if (key_cache.scalar_type() == at::kChar) {
    TORCH_CHECK(key_scale.has_value() && value_scale.has_value(), "int8 caches need scale pools");
    HEADRACE_DISPATCH_FLOAT(query.scalar_type(), "decode_int8", [&] {
      using T = scalar_t;
      HEADRACE_DISPATCH_FLOAT(key_scale->scalar_type(), "scale", [&] {
        decode_attention<T, int8_t, scalar_t>(query, key_cache, value_cache, &*key_scale,
                                              &*value_scale, block_tables, context_lens, scale, out);
      });
    });
    return out;
  }
  TORCH_CHECK(key_cache.scalar_type() == query.scalar_type(), "cache and query dtypes differ");
  HEADRACE_DISPATCH_FLOAT(query.scalar_type(), "decode", [&] {
    decode_attention<scalar_t, scalar_t, float>(query, key_cache, value_cache, nullptr, nullptr,
                                                block_tables, context_lens, scale, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(headrace_cpu, m) {
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "Tensor slot_mapping, Tensor(c!)? key_scale=None, Tensor(d!)? value_scale=None) -> ()");
  m.def(
      "paged_decode_attention(Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_tables, Tensor context_lens, float scale, Tensor? key_scale=None, "
      "Tensor? value_scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(headrace_cpu, CPU, m) {
  m.impl("reshape_and_cache", &reshape_and_cache);
  m.impl("paged_decode_attention", &paged_decode_attention);
}

}  // namespace headrace_cpu
