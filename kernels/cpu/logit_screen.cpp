// Greedy tokens through an int8 screen of the lm_head: the argmax of the exact logits, with
// most of the vocabulary ruled out by int8 logits and a bound on their error. The torch
// reference is ops/logit_screen.py (`screened_argmax_reference`: the argmax of float32 logits).
//
// Why: beside int8 layers, the lm_head left in the model dtype is the largest GEMM of a small
// model's step (SmolLM2: 28M of 134M multiply-adds per token; on CPUs whose bf16 dot products
// are slow, more time than all 30 int8 layers). A greedy row needs only its argmax.
//
// The screen: `approx` [T, V] are int8 logits l~_j = s_x q_x . s_j q_j (packed_linear_int8) of
// x R and W R, R an orthonormal block Hadamard rotation (ops/rotation.py: it spreads the final
// hidden state's outlier channels, which otherwise set a coarse int8 step for the whole row:
// SmolLM2's screen kept a median of 24k tokens unrotated, 2 rotated). With x R = x^ + e_x
// (x^ = s_x q_x) and W_j R = W^_j + e_j, since l_j = x R . W_j R,
//   l_j - l~_j = e_x . W_j R + x^ . e_j,  so  |l_j - l~_j| <= |e_x| |W_j| + |x^| |e_j| = B_j
// (Cauchy-Schwarz; |W_j| and |e_j| are precomputed per row). The largest exact logit is at
// least L = max_j (l~_j - B_j), so only tokens with l~_j + B_j >= L can be the argmax: those
// are scored exactly (float32 sums of x . W_j in the model dtype's values) and the best one
// wins, the lowest index on a tie. B_j also covers float32 rounding (of the exact sums, of
// l~_j and of the norms), so the answer is the argmax of the exact float32 logits whatever
// the quantization error. Rows with non-finite values are scored exactly in full.
#include "common.h"

namespace headrace_cpu {
namespace {

// x (float32) . w (k values of T), float32 sums over two vector accumulators.
template <typename T>
inline float dot_row(const float* x, const T* w, int64_t k) {
  constexpr int64_t kW = Vec::size();
  Vec a0(0.0f), a1(0.0f);
  int64_t i = 0;
  for (; i + 2 * kW <= k; i += 2 * kW) {
    a0 = at::vec::fmadd(Vec::loadu(x + i), load_float(w + i), a0);
    a1 = at::vec::fmadd(Vec::loadu(x + i + kW), load_float(w + i + kW), a1);
  }
  for (; i + kW <= k; i += kW) a0 = at::vec::fmadd(Vec::loadu(x + i), load_float(w + i), a0);
  float sum = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, a0 + a1);
  for (; i < k; ++i) sum += x[i] * static_cast<float>(w[i]);
  return sum;
}

struct RowBound {
  float a, b;  // B_j = a |W_j| + b |e_j| + kApproxRounding |l~_j|
};

// l~_j = (float(acc) * s_x) * s_j: two roundings of a float32 product (acc is exact).
constexpr float kUnit = 0x1p-24f;
constexpr float kApproxRounding = 4 * kUnit;

// |e_x| and |x^| of one row (x: x R in float32), widened by what float32 rounding may add to
// B_j: the exact sum of k products is within k u |x| |W_j| of the real one, x R as computed
// within a few u |x| of the real one (the second k u |x|), the norms within a relative 1e-5.
RowBound row_bound(const float* x, const int8_t* q, float scale, int64_t k) {
  double err = 0.0, quant = 0.0, norm = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    const double xq = static_cast<double>(scale) * q[i], e = x[i] - xq;
    err += e * e;
    quant += xq * xq;
    norm += static_cast<double>(x[i]) * x[i];
  }
  const double widen = 1.0 + 1e-5;
  return {static_cast<float>((std::sqrt(err) + 2.0 * k * kUnit * std::sqrt(norm)) * widen),
          static_cast<float>(std::sqrt(quant) * widen)};
}

// The row's token: see the file comment. x: [k] float32; approx, norms, error_norms: [v].
template <typename T>
int64_t screened_row(const float* x, const float* approx, const T* weight, int64_t k, int64_t v,
                     const float* norms, const float* error_norms, RowBound bound,
                     std::vector<float>& scratch) {
  constexpr int64_t kW = Vec::size();
  const Vec a(bound.a), b(bound.b), rel(kApproxRounding);
  auto margin = [&](int64_t j) {  // B_j for the kW tokens from j
    const Vec l = Vec::loadu(approx + j);
    return a * Vec::loadu(norms + j) + b * Vec::loadu(error_norms + j) + rel * l.abs();
  };
  auto margin_at = [&](int64_t j) {  // B_j of one token (the tail past whole vectors)
    return bound.a * norms[j] + bound.b * error_norms[j] + kApproxRounding * std::abs(approx[j]);
  };
  Vec low(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kW <= v; j += kW) low = at::vec::maximum(low, Vec::loadu(approx + j) - margin(j));
  float lower = at::vec::vec_reduce_all<float>(
      [](Vec p, Vec q) { return at::vec::maximum(p, q); }, low);
  for (; j < v; ++j) lower = std::max(lower, approx[j] - margin_at(j));
  if (!std::isfinite(lower) || !std::isfinite(bound.a) || !std::isfinite(bound.b)) {
    scratch.resize(v);  // no usable bound: every token exactly, torch.argmax's NaN rule
    for (int64_t t = 0; t < v; ++t) scratch[t] = dot_row(x, weight + t * k, k);
    return first_argmax(scratch.data(), v);
  }
  float best = -std::numeric_limits<float>::infinity();
  int64_t best_j = -1;
  auto score = [&](int64_t t) {
    const float exact = dot_row(x, weight + t * k, k);
    if (best_j < 0 || exact > best) {
      best = exact;
      best_j = t;
    }
  };
  const Vec lv(lower);
  for (j = 0; j + kW <= v; j += kW) {
    int mask = ge_mask(Vec::loadu(approx + j) + margin(j), lv);  // tokens that may win
    while (mask != 0) {
      const int l = __builtin_ctz(mask);
      mask &= mask - 1;
      score(j + l);
    }
  }
  for (; j < v; ++j) {
    if (approx[j] + margin_at(j) >= lower) score(j);
  }
  return best_j;
}

template <typename T>
void screened_argmax_impl(const at::Tensor& approx, const at::Tensor& x, const at::Tensor& x_rot,
                          const at::Tensor& codes,
                          const at::Tensor& x_scale, const at::Tensor& weight,
                          const at::Tensor& norms, const at::Tensor& error_norms, int64_t vocab,
                          at::Tensor& out) {
  const int64_t rows = x.size(0), k = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  const float* ap = approx.data_ptr<float>();
  const int8_t* qp = codes.data_ptr<int8_t>();
  const float* sp = x_scale.data_ptr<float>();
  int64_t* dst = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(k), scratch;
    for (int64_t r = begin; r < end; ++r) {
      const RowBound bound = row_bound(x_rot.data_ptr<float>() + r * x_rot.stride(0),
                                       qp + r * codes.stride(0), sp[r], k);
      to_float(xp + r * x.stride(0), row.data(), k);
      dst[r] = screened_row(row.data(), ap + r * approx.stride(0), wp, k, vocab,
                            norms.data_ptr<float>(), error_norms.data_ptr<float>(), bound, scratch);
    }
  });
}

// approx: [T, >= vocab] float32 int8 logits; x: [T, K] (model dtype); x_rot: [T, K] float32
// x R; codes: [T, K] int8 and x_scale: [T] float32, x R as quantized for approx; weight:
// [>= vocab, K] the lm_head (x's dtype); norms, error_norms: [>= vocab] float32 |W_j| and
// |W_j R - s_j q_j| → [T] int64.
at::Tensor screened_argmax(const at::Tensor& approx, const at::Tensor& x, const at::Tensor& x_rot,
                           const at::Tensor& codes,
                           const at::Tensor& x_scale, const at::Tensor& weight,
                           const at::Tensor& norms, const at::Tensor& error_norms, int64_t vocab) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x: [T, K] with a unit last stride");
  const int64_t rows = x.size(0), k = x.size(1);
  TORCH_CHECK(vocab > 0, "vocab > 0");
  TORCH_CHECK(approx.dim() == 2 && approx.size(0) == rows && approx.size(1) >= vocab &&
                  approx.stride(1) == 1 && approx.scalar_type() == at::kFloat,
              "approx: [T, >= vocab] float32");
  TORCH_CHECK(x_rot.dim() == 2 && x_rot.size(0) == rows && x_rot.size(1) == k &&
                  x_rot.stride(1) == 1 && x_rot.scalar_type() == at::kFloat,
              "x_rot: [T, K] float32");
  TORCH_CHECK(codes.dim() == 2 && codes.size(0) == rows && codes.size(1) == k &&
                  codes.stride(1) == 1 && codes.scalar_type() == at::kChar,
              "codes: [T, K] int8");
  TORCH_CHECK(x_scale.numel() == rows && x_scale.is_contiguous() &&
                  x_scale.scalar_type() == at::kFloat,
              "x_scale: [T] float32");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) >= vocab && weight.size(1) == k &&
                  weight.is_contiguous() && weight.scalar_type() == x.scalar_type(),
              "weight: [>= vocab, K] contiguous, x's dtype");
  for (const at::Tensor* t : {&norms, &error_norms}) {
    TORCH_CHECK(t->numel() >= vocab && t->is_contiguous() && t->scalar_type() == at::kFloat,
                "norms: [>= vocab] float32");
  }
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  HEADRACE_DISPATCH_FLOAT(x.scalar_type(), "screened_argmax", [&] {
    screened_argmax_impl<scalar_t>(approx, x, x_rot, codes, x_scale, weight, norms, error_norms,
                                   vocab, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(headrace_cpu, m) {
  m.def(
      "screened_argmax(Tensor approx, Tensor x, Tensor x_rot, Tensor codes, Tensor x_scale, "
      "Tensor weight, Tensor norms, Tensor error_norms, int vocab) -> Tensor");
}

TORCH_LIBRARY_IMPL(headrace_cpu, CPU, m) { m.impl("screened_argmax", &screened_argmax); }

}  // namespace headrace_cpu
