// Paged KV cache kernels for the CPU: write new K/V into the pages (quantizing for an int8
// cache) and one-query-per-sequence decode attention that reads the pages in place.
//
// The torch references are ops/attention.py and ops/kv_cache.py; tests/kernels/test_cpu_kernels.py
// compares them. Layouts (all addressed through strides, so head-major pools work as-is):
//   key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim] (model dtype or int8)
//   key_scale, value_scale: [num_blocks, block_size, num_kv_heads] (int8 caches only)
#include "common.h"

namespace headrace_cpu {
namespace {

constexpr float kInt8Max = 127.0f;
constexpr float kMinScale = 1.0f / 1048576.0f;  // 2^-20, ops.quant.MIN_SCALE

struct PoolView {
  char* data;
  int64_t block_stride, token_stride, head_stride;  // in elements
  int64_t block_size;
};

PoolView pool_view(const at::Tensor& pool) {
  TORCH_CHECK(pool.dim() >= 3, "a KV pool is [num_blocks, block_size, num_kv_heads, ...]");
  if (pool.dim() == 4) {
    TORCH_CHECK(pool.stride(3) == 1, "KV pages need a unit stride along head_dim");
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

template <typename T>
void cache_rows(const at::Tensor& x, const at::Tensor& cache, const int64_t* slots,
                int64_t num_tokens) {
  const int64_t heads = x.size(1), dim = x.size(2);
  const PoolView pool = pool_view(cache);
  const T* src = x.data_ptr<T>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0) continue;  // a padding token
      for (int64_t h = 0; h < heads; ++h) {
        T* dst = row_ptr<T>(pool, slot / pool.block_size, slot % pool.block_size, h);
        std::memcpy(dst, src + t * s0 + h * s1, dim * sizeof(T));
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
  const PoolView scale_pool = pool_view(scales);
  const T* src = x.data_ptr<T>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(dim);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0) continue;
      const int64_t block = slot / pool.block_size, offset = slot % pool.block_size;
      for (int64_t h = 0; h < heads; ++h) {
        to_float(src + t * s0 + h * s1, row.data(), dim);
        float amax = 0.0f;
        for (int64_t d = 0; d < dim; ++d) amax = std::max(amax, std::fabs(row[d]));
        const S stored = static_cast<S>(std::max(amax / kInt8Max, kMinScale));
        const float scale = static_cast<float>(stored);
        *row_ptr<S>(scale_pool, block, offset, h) = stored;
        int8_t* dst = row_ptr<int8_t>(pool, block, offset, h);
        for (int64_t d = 0; d < dim; ++d) {
          const float q = std::floor(row[d] / scale + 0.5f);
          dst[d] = static_cast<int8_t>(std::min(std::max(q, -kInt8Max), kInt8Max));
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

// q · k for `groups` query rows against one cached row, in float32.
inline void dot_rows(const float* q, int64_t groups, int64_t dim, const float* k, float* out) {
  for (int64_t g = 0; g < groups; ++g) out[g] = dot(q + g * dim, k, dim);
}

// One (sequence, kv head): softmax(q Kᵀ · scale) V for the `groups` query heads that share it.
// Two passes over the pages (scores, then values); scores for the whole context sit in
// `scores` ([groups, context_len] float32), which stays small next to the pages themselves.
template <typename T, typename C, typename S>
void attend_one(const T* q, int64_t q_head_stride, T* out, int64_t out_head_stride,
                const PoolView& kp, const PoolView& vp, const PoolView* ksp, const PoolView* vsp,
                const int64_t* table, int64_t context_len, int64_t kv_head, int64_t groups,
                int64_t dim, float scale, std::vector<float>& scores, std::vector<float>& qf,
                std::vector<float>& row, std::vector<float>& acc) {
  qf.resize(groups * dim);
  for (int64_t g = 0; g < groups; ++g) to_float(q + g * q_head_stride, qf.data() + g * dim, dim);
  scores.resize(groups * context_len);
  row.resize(dim);
  const int64_t bs = kp.block_size;
  std::vector<float> s(groups);
  for (int64_t pos = 0; pos < context_len; ++pos) {
    const int64_t block = table[pos / bs], offset = pos % bs;
    to_float(row_ptr<C>(kp, block, offset, kv_head), row.data(), dim);
    dot_rows(qf.data(), groups, dim, row.data(), s.data());
    float k_scale = scale;
    if constexpr (std::is_same_v<C, int8_t>) {
      k_scale *= static_cast<float>(*row_ptr<S>(*ksp, block, offset, kv_head));
    }
    for (int64_t g = 0; g < groups; ++g) scores[g * context_len + pos] = s[g] * k_scale;
  }
  for (int64_t g = 0; g < groups; ++g) softmax_inplace(scores.data() + g * context_len, context_len);
  acc.assign(groups * dim, 0.0f);
  for (int64_t pos = 0; pos < context_len; ++pos) {
    const int64_t block = table[pos / bs], offset = pos % bs;
    to_float(row_ptr<C>(vp, block, offset, kv_head), row.data(), dim);
    float v_scale = 1.0f;
    if constexpr (std::is_same_v<C, int8_t>) {
      v_scale = static_cast<float>(*row_ptr<S>(*vsp, block, offset, kv_head));
    }
    for (int64_t g = 0; g < groups; ++g) {
      axpy(scores[g * context_len + pos] * v_scale, row.data(), acc.data() + g * dim, dim);
    }
  }
  for (int64_t g = 0; g < groups; ++g) from_float(acc.data() + g * dim, out + g * out_head_stride, dim);
}

template <typename T, typename C, typename S>
void decode_attention(const at::Tensor& query, const at::Tensor& key_cache,
                      const at::Tensor& value_cache, const at::Tensor* key_scale,
                      const at::Tensor* value_scale, const at::Tensor& block_tables,
                      const at::Tensor& context_lens, double scale, at::Tensor& out) {
  const int64_t num_seqs = query.size(0), num_heads = query.size(1), dim = query.size(2);
  const int64_t kv_heads = key_cache.size(2), groups = num_heads / kv_heads;
  const PoolView kp = pool_view(key_cache), vp = pool_view(value_cache);
  PoolView ksp{}, vsp{};
  if (key_scale != nullptr) {
    ksp = pool_view(*key_scale);
    vsp = pool_view(*value_scale);
  }
  const at::Tensor tables = block_tables.to(at::kLong).contiguous();
  const at::Tensor lens = context_lens.to(at::kLong).contiguous();
  const int64_t* tab = tables.data_ptr<int64_t>();
  const int64_t* len = lens.data_ptr<int64_t>();
  const int64_t width = tables.size(1);
  const T* q = query.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const int64_t qs0 = query.stride(0), qs1 = query.stride(1);
  const int64_t os0 = out.stride(0), os1 = out.stride(1);
  at::parallel_for(0, num_seqs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, qf, row, acc;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t seq = i / kv_heads, kv_head = i % kv_heads;
      const int64_t first = kv_head * groups;
      attend_one<T, C, S>(q + seq * qs0 + first * qs1, qs1, o + seq * os0 + first * os1, os1, kp,
                          vp, key_scale ? &ksp : nullptr, value_scale ? &vsp : nullptr,
                          tab + seq * width, len[seq], kv_head, groups, dim,
                          static_cast<float>(scale), scores, qf, row, acc);
    }
  });
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
