// Row-wise CPU kernels of the decoder layer: RMSNorm (plain, and fused with the residual add),
// rotary embedding in place, and silu(gate) * up. One pass over each row instead of the
// 4-8 separate torch ops (and temporaries) of the references in worker/models/llama.py,
// ops/rotary.py and ops/activation.py, which tests/kernels/test_cpu_kernels.py compares.
#include "common.h"

namespace headrace_cpu {
namespace {

template <typename T>
std::vector<float> weight_float(const at::Tensor& weight) {
  std::vector<float> w(weight.numel());
  to_float(weight.data_ptr<T>(), w.data(), weight.numel());
  return w;
}

// out = weight * round(x * rsqrt(mean(x²) + eps)), as HF's LlamaRMSNorm rounds (x in float32;
// `x` is overwritten). w: the weight in float32.
template <typename T>
inline void rms_norm_row(float* x, const float* w, T* out, int64_t n, float eps) {
  const float ss = at::vec::map_reduce_all<float>(
      [](Vec v) { return v * v; }, [](Vec a, Vec b) { return a + b; }, x, n);
  const Vec r(1.0f / std::sqrt(ss / static_cast<float>(n) + eps));
  constexpr int64_t W = Vec::size();
  for (int64_t i = 0; i < n; i += W) {
    const int64_t count = std::min(W, n - i);
    // The normalized row is rounded to T before the weight multiplies it (HF's order).
    const Vec v = round_to<T>(Vec::loadu(x + i, count) * r) * Vec::loadu(w + i, count);
    store_as<T>(v, out + i, count);
  }
}

template <typename T>
void rms_norm_impl(const at::Tensor& x, const at::Tensor& weight, at::Tensor& out, double eps) {
  const int64_t rows = x.size(0), n = x.size(1);
  const T* src = x.data_ptr<T>();
  const std::vector<float> w = weight_float<T>(weight);
  T* dst = out.data_ptr<T>();
  const int64_t xs = x.stride(0), os = out.stride(0);
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> row(n);
    for (int64_t r = begin; r < end; ++r) {
      to_float(src + r * xs, row.data(), n);
      rms_norm_row(row.data(), w.data(), dst + r * os, n, static_cast<float>(eps));
    }
  });
}

// residual ← round(x + residual); x ← rms_norm(residual).
template <typename T>
void fused_add_rms_norm_impl(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                             double eps) {
  const int64_t rows = x.size(0), n = x.size(1);
  T* xp = x.data_ptr<T>();
  T* rp = residual.data_ptr<T>();
  const std::vector<float> w = weight_float<T>(weight);
  const int64_t xs = x.stride(0), rs = residual.stride(0);
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> row(n);
    for (int64_t r = begin; r < end; ++r) {
      T* xr = xp + r * xs;
      T* rr = rp + r * rs;
      int64_t i = 0;
      for (; i + Vec::size() <= n; i += Vec::size()) {
        // The sum, rounded to T: the new residual, and what the norm reads.
        const Vec sum = round_to<T>(load_float(xr + i) + load_float(rr + i));
        store_as<T>(sum, rr + i);
        sum.store(row.data() + i);
      }
      for (; i < n; ++i) {
        rr[i] = static_cast<T>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
        row[i] = static_cast<float>(rr[i]);
      }
      rms_norm_row(row.data(), w.data(), xr, n, static_cast<float>(eps));
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x: [T, hidden] with a unit last stride");
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == x.scalar_type());
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  HEADRACE_DISPATCH_FLOAT(x.scalar_type(), "rms_norm", [&] {
    rms_norm_impl<scalar_t>(x, weight, out, eps);
  });
  return out;
}

void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && residual.stride(1) == 1, "rows need a unit stride");
  TORCH_CHECK(x.sizes() == residual.sizes() && x.scalar_type() == residual.scalar_type());
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == x.scalar_type());
  HEADRACE_DISPATCH_FLOAT(x.scalar_type(), "fused_add_rms_norm", [&] {
    fused_add_rms_norm_impl<scalar_t>(x, residual, weight, eps);
  });
}

// x ← x * cos + rotate_half(x) * sin for every head of every token, in place (rotate-half
// convention: the first and second halves of head_dim pair up).
template <typename T, typename C>
void rotate_heads(at::Tensor& x, const int64_t* positions, const C* cos, const C* sin,
                  int64_t table_stride) {
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  T* p = x.data_ptr<T>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(dim), rotated(dim), c(dim), s(dim);
    for (int64_t t = begin; t < end; ++t) {
      to_float(cos + positions[t] * table_stride, c.data(), dim);
      to_float(sin + positions[t] * table_stride, s.data(), dim);
      for (int64_t h = 0; h < heads; ++h) {
        T* r = p + t * s0 + h * s1;
        to_float(r, row.data(), dim);
        constexpr int64_t w = Vec::size();
        int64_t i = 0;
        for (; i + w <= half; i += w) {
          const Vec x1 = Vec::loadu(&row[i]), x2 = Vec::loadu(&row[i + half]);
          (x1 * Vec::loadu(&c[i]) + x2.neg() * Vec::loadu(&s[i])).store(&rotated[i]);
          (x2 * Vec::loadu(&c[i + half]) + x1 * Vec::loadu(&s[i + half])).store(&rotated[i + half]);
        }
        for (; i < half; ++i) {
          rotated[i] = row[i] * c[i] + (-row[i + half]) * s[i];
          rotated[i + half] = row[i + half] * c[i + half] + row[i] * s[i + half];
        }
        from_float(rotated.data(), r, dim);
      }
    }
  });
}

void rotary_embedding(at::Tensor& query, at::Tensor& key, const at::Tensor& positions,
                      const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3, "query: [T, H, D]; key: [T, KVH, D]");
  TORCH_CHECK(query.stride(2) == 1 && key.stride(2) == 1, "heads need a unit last stride");
  TORCH_CHECK(query.size(2) % 2 == 0 && cos.size(1) == query.size(2), "cos/sin: [positions, D]");
  TORCH_CHECK(cos.stride(1) == 1 && sin.strides() == cos.strides());
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous());
  const int64_t* pos = positions.data_ptr<int64_t>();
  HEADRACE_DISPATCH_FLOAT(query.scalar_type(), "rotary", [&] {
    using T = scalar_t;
    HEADRACE_DISPATCH_FLOAT(cos.scalar_type(), "rotary_table", [&] {
      rotate_heads<T, scalar_t>(query, pos, cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(),
                                cos.stride(0));
      rotate_heads<T, scalar_t>(key, pos, cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(),
                                cos.stride(0));
    });
  });
}

// [T, 2I] (gate, then up) → [T, I]: silu(gate) * up, rounded once.
template <typename T>
void silu_and_mul_impl(const at::Tensor& x, at::Tensor& out) {
  const int64_t rows = x.size(0), inner = out.size(1);
  const T* src = x.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  const int64_t xs = x.stride(0), os = out.stride(0);
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> g(inner), u(inner);
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = src + r * xs;
      to_float(gate, g.data(), inner);
      to_float(gate + inner, u.data(), inner);
      // silu(g) = g / (1 + exp(-g)), vectorized (a scalar exp per element was the cost).
      // bf16/fp16 outputs round away far more than exp_u20's error (<= 20 float32 ulp, about
      // twice as fast as the 1-ulp exp); float32 keeps the 1-ulp one (token-exact vs HF).
      if constexpr (std::is_same_v<T, float>) {
        at::vec::map2(
            [](Vec x, Vec y) { return x / (Vec(1.0f) + x.neg().exp()) * y; }, g.data(), g.data(),
            u.data(), inner);
      } else {
        at::vec::map2(
            [](Vec x, Vec y) { return x / (Vec(1.0f) + x.neg().exp_u20()) * y; }, g.data(),
            g.data(), u.data(), inner);
      }
      from_float(g.data(), dst + r * os, inner);
    }
  });
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0, "x: [T, 2I]");
  at::Tensor out = at::empty({x.size(0), x.size(1) / 2}, x.options());
  HEADRACE_DISPATCH_FLOAT(x.scalar_type(), "silu_and_mul", [&] {
    silu_and_mul_impl<scalar_t>(x, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(headrace_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def(
      "rotary_embedding(Tensor(a!) query, Tensor(b!) key, Tensor positions, Tensor cos, "
      "Tensor sin) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(headrace_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("rotary_embedding", &rotary_embedding);
  m.impl("silu_and_mul", &silu_and_mul);
}

}  // namespace headrace_cpu

namespace headrace_cpu {
namespace {

template <typename T>
void argmax_impl(const at::Tensor& x, at::Tensor& out) {
  const int64_t rows = x.size(0), n = x.size(1);
  const T* src = x.data_ptr<T>();
  int64_t* dst = out.data_ptr<int64_t>();
  const int64_t xs = x.stride(0);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(n);
    for (int64_t r = begin; r < end; ++r) {
      to_float(src + r * xs, row.data(), n);
      dst[r] = first_argmax(row.data(), n);
    }
  });
}

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) > 0, "x: [R, V], V > 0");
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  HEADRACE_DISPATCH_FLOAT(x.scalar_type(), "argmax_rows", [&] { argmax_impl<scalar_t>(x, out); });
  return out;
}

// Inverse-CDF sampling from softmax(x * inv_temp), one uniform per row: the first index whose
// cumulative probability exceeds u * total (ops.sampling.sample_rows_reference: softmax, cumsum,
// searchsorted). torch's cumsum runs one scalar add at a time (~2.7 ms for 32 rows of a 49k
// vocabulary, most of a sampled step's sampling); here the probabilities are summed a vector
// at a time and only the block that holds the crossing is walked element by element.
// exp_u20 (<= 20 ulp): a random draw has no exact answer to keep, and it is ~2x the speed.
template <typename T>
void sample_impl(const at::Tensor& x, const float* inv_temp, const float* u, at::Tensor& out) {
  constexpr int64_t w = Vec::size(), kBlock = 4 * w;  // one horizontal sum per 4 vectors
  const int64_t rows = x.size(0), n = x.size(1), blocks = (n + kBlock - 1) / kBlock;
  const T* src = x.data_ptr<T>();
  int64_t* dst = out.data_ptr<int64_t>();
  const int64_t xs = x.stride(0);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(blocks * kBlock, 0.0f), sums(blocks);
    for (int64_t r = begin; r < end; ++r) {
      to_float(src + r * xs, p.data(), n);
      const Vec t(inv_temp[r]);
      const float max = at::vec::map_reduce_all<float>(
          [t](Vec a) { return a * t; }, [](Vec a, Vec b) { return at::vec::maximum(a, b); },
          p.data(), n);
      if (!std::isfinite(max)) {  // no distribution to sample (NaN, +inf, or all masked):
        dst[r] = first_argmax(p.data(), n);  // the argmax, as a greedy row would take
        continue;
      }
      const Vec vmax(max);
      double total = 0.0;
      for (int64_t b = 0; b < blocks; ++b) {
        Vec sum(0.0f);
        for (int64_t i = b * kBlock; i < (b + 1) * kBlock; i += w) {
          const int64_t count = std::max<int64_t>(0, std::min(w, n - i));
          Vec e = (Vec::loadu(p.data() + i) * t - vmax).exp_u20();
          if (count < w) e = Vec::set(Vec(0.0f), e, count);  // the padding has no mass
          e.store(p.data() + i);
          sum = sum + e;
        }
        sums[b] = at::vec::vec_reduce_all<float>([](Vec a, Vec c) { return a + c; }, sum);
        total += sums[b];
      }
      const double target = static_cast<double>(u[r]) * total;
      int64_t pick = -1, last = 0;
      double cum = 0.0;
      for (int64_t b = 0; b < blocks && pick < 0; ++b) {
        if (sums[b] > 0.0f) last = b;
        if (cum + sums[b] > target) {
          double inner = cum;
          for (int64_t j = b * kBlock; j < std::min(n, (b + 1) * kBlock); ++j) {
            inner += p[j];
            if (inner > target && p[j] > 0.0f) {
              pick = j;
              break;
            }
          }
        }
        cum += sums[b];
      }
      if (pick < 0) {  // rounding put the crossing past the end: the last index with mass
        pick = std::min(n, (last + 1) * kBlock) - 1;
        while (pick > 0 && !(p[pick] > 0.0f)) --pick;
      }
      dst[r] = pick;
    }
  });
}

at::Tensor sample_rows(const at::Tensor& x, const at::Tensor& inv_temp, const at::Tensor& u) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) > 0, "x: [R, V], V > 0");
  TORCH_CHECK(inv_temp.numel() == x.size(0) && u.numel() == x.size(0), "inv_temp, u: [R]");
  const at::Tensor it = inv_temp.to(at::kFloat).contiguous(), uu = u.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  HEADRACE_DISPATCH_FLOAT(x.scalar_type(), "sample_rows", [&] {
    sample_impl<scalar_t>(x, it.data_ptr<float>(), uu.data_ptr<float>(), out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(headrace_cpu, m) {
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("sample_rows(Tensor x, Tensor inv_temp, Tensor u) -> Tensor");
}

TORCH_LIBRARY_IMPL(headrace_cpu, CPU, m) {
  m.impl("argmax_rows", &argmax_rows);
  m.impl("sample_rows", &sample_rows);
}

}  // namespace headrace_cpu
