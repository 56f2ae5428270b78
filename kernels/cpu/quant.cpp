// W8A8's activation side on the CPU, one pass per row: divide by the SmoothQuant factors,
// rotate by the block Hadamard matrix (a fast Walsh-Hadamard transform per block), then
// symmetric per-token int8. The torch reference is ops/quant.py (`quantize_activations`:
// five passes over [M, K] in float32, and a [K/b, b] x [b, b] matmul for the rotation).
#include "common.h"

namespace headrace_cpu {
namespace {

// x ← x H for each block of `block` values, H the normalized Sylvester Hadamard matrix
// (the normalization is left to the caller). Butterflies of span h ≥ W (the vector width)
// run on whole vectors; the spans below W together are H_W applied to each W-chunk, done as
// W broadcast-FMAs against H_W's rows (`small`: W vectors) instead of scalar shuffles.
inline void hadamard_blocks(float* x, int64_t n, int64_t block, const Vec* small) {
  constexpr int64_t w = Vec::size();
  if (block < w) {  // too small for vectors: scalar butterflies
    for (int64_t start = 0; start < n; start += block) {
      float* b = x + start;
      for (int64_t h = 1; h < block; h *= 2) {
        for (int64_t i = 0; i < block; i += 2 * h) {
          for (int64_t j = i; j < i + h; ++j) {
            const float a = b[j], c = b[j + h];
            b[j] = a + c;
            b[j + h] = a - c;
          }
        }
      }
    }
    return;
  }
#if defined(CPU_CAPABILITY_AVX512)
  // In registers: span h is y = x * sign_h + x[j ^ h] (one permute and one FMA per stage).
  (void)small;
  alignas(64) int32_t idx[4][16];
  alignas(64) float sign[4][16];
  for (int s = 0; s < 4; ++s) {
    for (int j = 0; j < 16; ++j) {
      idx[s][j] = j ^ (1 << s);
      sign[s][j] = (j >> s) & 1 ? -1.0f : 1.0f;
    }
  }
  __m512i perm[4];
  __m512 sg[4];
  for (int s = 0; s < 4; ++s) {
    perm[s] = _mm512_load_si512(idx[s]);
    sg[s] = _mm512_load_ps(sign[s]);
  }
  for (int64_t i = 0; i < n; i += 16) {
    __m512 v = _mm512_loadu_ps(x + i);
    for (int s = 0; s < 4; ++s) v = _mm512_fmadd_ps(v, sg[s], _mm512_permutexvar_ps(perm[s], v));
    _mm512_storeu_ps(x + i, v);
  }
#else
  // H_W on each chunk as W broadcast-FMAs against its rows, four chunks at a time (four
  // independent FMA chains instead of one W-long dependency).
  int64_t i = 0;
  for (; i + 4 * w <= n; i += 4 * w) {
    Vec a0(0.0f), a1(0.0f), a2(0.0f), a3(0.0f);
    for (int64_t j = 0; j < w; ++j) {
      a0 = at::vec::fmadd(Vec(x[i + j]), small[j], a0);
      a1 = at::vec::fmadd(Vec(x[i + w + j]), small[j], a1);
      a2 = at::vec::fmadd(Vec(x[i + 2 * w + j]), small[j], a2);
      a3 = at::vec::fmadd(Vec(x[i + 3 * w + j]), small[j], a3);
    }
    a0.store(x + i);
    a1.store(x + i + w);
    a2.store(x + i + 2 * w);
    a3.store(x + i + 3 * w);
  }
  for (; i < n; i += w) {
    Vec acc(0.0f);
    for (int64_t j = 0; j < w; ++j) acc = at::vec::fmadd(Vec(x[i + j]), small[j], acc);
    acc.store(x + i);
  }
#endif
  for (int64_t start = 0; start < n; start += block) {
    float* b = x + start;
    for (int64_t h = w; h < block; h *= 2) {
      for (int64_t i = 0; i < block; i += 2 * h) {
        for (int64_t j = i; j < i + h; j += w) {
          const Vec a = Vec::loadu(b + j), c = Vec::loadu(b + j + h);
          (a + c).store(b + j);
          (a - c).store(b + j + h);
        }
      }
    }
  }
}

// The rows of H_W (unnormalized Sylvester: H[i][j] = (-1)^popcount(i & j)).
inline std::vector<Vec> hadamard_rows() {
  constexpr int64_t w = Vec::size();
  std::vector<Vec> rows;
  float row[w];
  for (int64_t i = 0; i < w; ++i) {
    for (int64_t j = 0; j < w; ++j) row[j] = __builtin_popcountll(i & j) % 2 ? -1.0f : 1.0f;
    rows.push_back(Vec::loadu(row));
  }
  return rows;
}

// `factors`: what each value is multiplied by before the rotation, 1 / smooth times the
// rotation's normalization (the Hadamard transform is linear, so the normalization moves
// ahead of it: one pass less); null when both are 1.
template <typename T>
void quantize_rows_impl(const at::Tensor& x, const float* factors, int64_t rotation,
                        at::Tensor& codes, at::Tensor& scales) {
  const int64_t rows = x.size(0), k = x.size(1);
  const T* src = x.data_ptr<T>();
  int8_t* dst = codes.data_ptr<int8_t>();
  float* sc = scales.data_ptr<float>();
  const int64_t xs = x.stride(0);
  const std::vector<Vec> small = rotation > 1 ? hadamard_rows() : std::vector<Vec>();
  // Rows are short (K ~ 10^3): a thread per few rows only pays off with several of them.
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(k);
    float* v = row.data();
    constexpr int64_t w = Vec::size();
    for (int64_t r = begin; r < end; ++r) {
      const T* x_row = src + r * xs;
      if (factors != nullptr) {
        int64_t i = 0;
        for (; i + w <= k; i += w) (load_float(x_row + i) * Vec::loadu(factors + i)).store(v + i);
        for (; i < k; ++i) v[i] = static_cast<float>(x_row[i]) * factors[i];
      } else {
        to_float(x_row, v, k);
      }
      if (rotation > 1) hadamard_blocks(v, k, rotation, small.data());
      const float scale = std::max(abs_max(v, k) / kInt8Max, kMinScale);
      sc[r] = scale;
      // round half up, as ops.quant.round_half_up: floor(x / scale + 0.5), clamped. Products
      // with reciprocals instead of the reference's divisions (two divisions per element were
      // most of this kernel's time): a code moves by one where a value sits on a rounding edge.
      quantize_store<true>(v, 1.0f / scale, dst + r * k, k);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x,
                                                 const std::optional<at::Tensor>& smooth,
                                                 int64_t rotation) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x: [M, K] with a unit last stride");
  const int64_t k = x.size(1);
  TORCH_CHECK(rotation >= 1 && (rotation & (rotation - 1)) == 0 && k % rotation == 0,
              "rotation must be a power of two dividing K");
  // 1 / smooth (a torch op here cost more than the divides), times 1 / sqrt(rotation).
  const float norm = rotation > 1 ? 1.0f / std::sqrt(static_cast<float>(rotation)) : 1.0f;
  std::vector<float> factors;
  if (smooth.has_value()) {
    TORCH_CHECK(smooth->numel() == k, "smooth: [K]");
    const at::Tensor s32 = smooth->to(at::kFloat).contiguous();
    factors.resize(k);
    at::vec::map([norm](Vec v) { return v.reciprocal() * Vec(norm); }, factors.data(),
                 s32.data_ptr<float>(), k);
  } else if (rotation > 1) {
    factors.assign(k, norm);
  }
  at::Tensor codes = at::empty({x.size(0), k}, x.options().dtype(at::kChar));
  at::Tensor scales = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  HEADRACE_DISPATCH_FLOAT(x.scalar_type(), "quantize_rows", [&] {
    quantize_rows_impl<scalar_t>(x, factors.empty() ? nullptr : factors.data(), rotation, codes,
                                 scales);
  });
  return {codes, scales};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(headrace_cpu, m) {
  m.def("quantize_rows(Tensor x, Tensor? smooth, int rotation) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(headrace_cpu, CPU, m) { m.impl("quantize_rows", &quantize_rows); }

}  // namespace headrace_cpu
