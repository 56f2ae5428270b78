// W8A8's activation side on the CPU, one pass per row: divide by the SmoothQuant factors,
// rotate by the block Hadamard matrix (a fast Walsh-Hadamard transform per block), then
// symmetric per-token int8. The torch reference is ops/quant.py (`quantize_activations`:
// five passes over [M, K] in float32, and a [K/b, b] x [b, b] matmul for the rotation).
#include "common.h"

namespace headrace_cpu {
namespace {

constexpr float kInt8Max = 127.0f;
constexpr float kMinScale = 1.0f / 1048576.0f;  // 2^-20, ops.quant.MIN_SCALE

// x ← x H for each block of `block` values, H the normalized Sylvester Hadamard matrix.
inline void hadamard_blocks(float* x, int64_t n, int64_t block) {
  const float norm = 1.0f / std::sqrt(static_cast<float>(block));
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
    for (int64_t i = 0; i < block; ++i) b[i] *= norm;
  }
}

template <typename T>
void quantize_rows_impl(const at::Tensor& x, const float* smooth, int64_t rotation,
                        at::Tensor& codes, at::Tensor& scales) {
  const int64_t rows = x.size(0), k = x.size(1);
  const T* src = x.data_ptr<T>();
  int8_t* dst = codes.data_ptr<int8_t>();
  float* sc = scales.data_ptr<float>();
  const int64_t xs = x.stride(0);
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> row(k);
    for (int64_t r = begin; r < end; ++r) {
      to_float(src + r * xs, row.data(), k);
      if (smooth != nullptr) {
        for (int64_t i = 0; i < k; ++i) row[i] /= smooth[i];
      }
      if (rotation > 1) hadamard_blocks(row.data(), k, rotation);
      float amax = 0.0f;
      for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(row[i]));
      const float scale = std::max(amax / kInt8Max, kMinScale);
      sc[r] = scale;
      int8_t* out = dst + r * k;
      for (int64_t i = 0; i < k; ++i) {
        const float q = std::floor(row[i] / scale + 0.5f);
        out[i] = static_cast<int8_t>(std::min(std::max(q, -kInt8Max), kInt8Max));
      }
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
  at::Tensor smooth32;
  if (smooth.has_value()) {
    TORCH_CHECK(smooth->numel() == k, "smooth: [K]");
    smooth32 = smooth->to(at::kFloat).contiguous();
  }
  at::Tensor codes = at::empty({x.size(0), k}, x.options().dtype(at::kChar));
  at::Tensor scales = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  HEADRACE_DISPATCH_FLOAT(x.scalar_type(), "quantize_rows", [&] {
    quantize_rows_impl<scalar_t>(x, smooth32.defined() ? smooth32.data_ptr<float>() : nullptr,
                                 rotation, codes, scales);
  });
  return {codes, scales};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(headrace_cpu, m) {
  m.def("quantize_rows(Tensor x, Tensor? smooth, int rotation) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(headrace_cpu, CPU, m) { m.impl("quantize_rows", &quantize_rows); }

}  // namespace headrace_cpu
