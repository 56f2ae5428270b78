// Linear layers on packed weights: out[M, N] = x[M, K] @ W[N, K]ᵀ (+ bias), W packed once at
// load, run on AMX tiles, on AVX-512 dot-product instructions (VNNI, and AVX512-BF16 or FMAs
// for bf16; CPUs without AMX), or on AVX2 FMAs and vpmaddubsw (CPUs with neither;
// gemm_drivers.h, gemm_avx2.h).
//
// bf16: x bf16, W bf16 → float32 accumulation (tdpbf16ps / vdpbf16ps / FMAs on widened bf16) → out
//       bf16.
// int8: x int8 per-token (scale [M]), W int8 per output channel (scale [N]) → int32
//       accumulation (tdpbssd / vpdpbusd / vpmaddubsw) → out = acc * x_scale[m] * w_scale[n]
//       (+ bias), in bf16/fp16/fp32.
//
// Why our own kernel: a decode step multiplies a few rows by every weight of the model, so the
// step costs what streaming the weights costs. oneDNN's GEMM reached ~8 GB/s of weights in the
// SmolLM2 decode step on a 2-core AMX Xeon; this kernel reads each packed weight tile once per
// 32 rows, in one sequential stream per group of 32 output columns. Without AMX, the epilogue
// (scales, bias, rounding, silu) fused into the GEMM is what oneDNN's and torch._int_mm's
// calls lack.
//
// Packed layout (`pack_*`): W padded to N % 32 == 0 and K % (32 | 64) == 0, then tiles of
// [16 k-groups][16 n][vnni] where vnni = 2 (bf16; int8 for the AVX2 driver) or 4 (int8)
// consecutive k of one column, ordered [N / 32][K / kstep][2 column halves] so that a column
// group is one contiguous run. For the AVX-512 driver, int8 weights are stored + 128
// (vpdpbusd multiplies unsigned by signed bytes). The torch references are ops/linear.py (`F.linear`) and ops/quant.py
// (`int8_gemm`).
#include "common.h"

#include "gemm_drivers.h"

namespace headrace_cpu {
namespace {

using gemm::kGroupCols;
using gemm::kTileRows;

bool kernel_ready() { return gemm::amx_ready() || gemm::dot_ready() || gemm::avx2_ready(); }

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// [N, K] → packed tiles (see the file comment); `vnni` consecutive k per column entry.
template <typename T>
at::Tensor pack_weight(const at::Tensor& weight, int64_t vnni) {
  TORCH_CHECK(weight.dim() == 2, "weight: [N, K]");
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  const int64_t kstep = kTileRows * vnni;  // k per tile: 32 (bf16) or 64 (int8)
  const int64_t np = round_up(n, kGroupCols), kp = round_up(k, kstep);
  at::Tensor packed = at::zeros({np / kGroupCols, kp / kstep, 2, kTileRows, 16 * vnni}, w.options());
  const T* src = w.data_ptr<T>();
  T* dst = packed.data_ptr<T>();
  at::parallel_for(0, np / kGroupCols, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t kb = 0; kb < kp / kstep; ++kb) {
        for (int64_t half = 0; half < 2; ++half) {
          T* tile = dst + ((g * (kp / kstep) + kb) * 2 + half) * kTileRows * 16 * vnni;
          for (int64_t r = 0; r < kTileRows; ++r) {
            for (int64_t c = 0; c < 16; ++c) {
              const int64_t col = g * kGroupCols + half * 16 + c;
              for (int64_t e = 0; e < vnni; ++e) {
                const int64_t kk = kb * kstep + r * vnni + e;
                if (col < n && kk < k) tile[(r * 16 + c) * vnni + e] = src[col * k + kk];
              }
            }
          }
        }
      }
    }
  });
  return packed;
}

at::Tensor pack_bf16(const at::Tensor& weight) {
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "pack_bf16 takes a bf16 weight");
  return pack_weight<at::BFloat16>(weight, 2);
}

at::Tensor pack_int8(const at::Tensor& weight) {
  TORCH_CHECK(weight.scalar_type() == at::kChar, "pack_int8 takes an int8 weight");
  at::Tensor packed = pack_weight<int8_t>(weight, 4);
  // The AVX-512 driver's vpdpbusd takes the weights as its unsigned operand.
  if (gemm::dot_ready() && !gemm::amx_ready()) packed.view(at::kByte).add_(128);
  return packed;
}

#if defined(HEADRACE_AMX) || defined(HEADRACE_AVX512_DOT) || defined(HEADRACE_AVX2_GEMM)
#define HEADRACE_GEMM 1
#endif

// The epilogues below work on `Vec`s (16 lanes with AVX-512, 8 with AVX2): a 32-column
// group is 32 / W vectors per row, the last group's columns past N masked by `count`.
constexpr int64_t kW = Vec::size();

// x: [M, K] contiguous with K a multiple of `kstep`, or a zero-padded copy of it.
at::Tensor padded_rows(const at::Tensor& x, int64_t kp) {
  if (x.size(1) == kp && x.is_contiguous()) return x;
  at::Tensor out = at::zeros({x.size(0), kp}, x.options());
  out.narrow(1, 0, x.size(1)).copy_(x);
  return out;
}

// What every packed_linear_* op checks of its inputs: x [M, K] of `dtype` (bf16 or int8) and
// a weight packed for it (`pack_*`) with room for K; returns the packed k-steps (kblocks).
int64_t check_packed(const at::Tensor& x, const at::Tensor& packed, at::ScalarType dtype) {
  TORCH_CHECK(kernel_ready(), "this CPU (or build) has no AMX, AVX-512 VNNI + BF16 or AVX2");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == dtype, "x: [M, K] ", dtype);
  const int64_t kstep = dtype == at::kChar ? 64 : 32;  // k per packed tile
  // [groups, kblocks, 2 halves, 16 k-groups, 16 columns x vnni]: the last dim is kstep.
  TORCH_CHECK(packed.dim() == 5 && packed.scalar_type() == dtype && packed.size(3) == kTileRows &&
                  packed.size(4) == kstep,
              "packed: a weight packed by pack_", dtype == at::kChar ? "int8" : "bf16");
  const int64_t kblocks = packed.size(1);
  TORCH_CHECK(x.size(1) <= kblocks * kstep, "x / packed weight mismatch");
  return kblocks;
}

at::Tensor packed_linear_bf16(const at::Tensor& x, const at::Tensor& packed, int64_t n,
                              const std::optional<at::Tensor>& bias) {
  const int64_t kblocks = check_packed(x, packed, at::kBFloat16);
  const int64_t m = x.size(0), groups = packed.size(0);
  TORCH_CHECK(groups * kGroupCols >= n, "x / packed weight mismatch");
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0) return out;
#ifdef HEADRACE_GEMM
  const at::Tensor xa = padded_rows(x, kblocks * 32);
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  at::BFloat16* o = out.data_ptr<at::BFloat16>();
  auto epilogue = [&](const float* acc, int64_t m0, int64_t rows, int64_t col0) {
    const int64_t cols = std::min<int64_t>(kGroupCols, n - col0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; c += kW) {
        const int64_t count = std::min(kW, cols - c);
        Vec v = Vec::loadu(acc + r * 32 + c, count);
        if (bp) v = v + Vec::loadu(bp + col0 + c, count);
        store_as(v, o + (m0 + r) * n + col0 + c, count);
      }
    }
  };
  gemm::run<false>(static_cast<const char*>(xa.data_ptr()), m, xa.size(1) * 2,
                   static_cast<const char*>(packed.data_ptr()), groups, kblocks, epilogue);
#endif
  return out;
}

// silu(gate) * up of a gate_up projection whose packed weight holds, in each 32-column group,
// 16 gate columns and the 16 matching up columns (`ops.linear.gated_packed_weight`): the
// epilogue writes [M, inner] directly, so the [M, 2 * inner] projection output is never
// stored and read back. The values are those of packed_linear_bf16 then silu_and_mul: gate and
// up rounded to bf16 first, then the same float32 ops in the same order.
at::Tensor packed_linear_silu_bf16(const at::Tensor& x, const at::Tensor& packed, int64_t inner,
                                   const std::optional<at::Tensor>& bias) {
  const int64_t kblocks = check_packed(x, packed, at::kBFloat16);
  const int64_t m = x.size(0), groups = packed.size(0);
  TORCH_CHECK(inner % 16 == 0 && groups * kGroupCols == 2 * inner, "packed: 2 * inner columns");
  at::Tensor out = at::empty({m, inner}, x.options());
  if (m == 0) return out;
#ifdef HEADRACE_GEMM
  const at::Tensor xa = padded_rows(x, kblocks * 32);
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;  // gate, then up
  at::BFloat16* o = out.data_ptr<at::BFloat16>();
  auto epilogue = [&](const float* acc, int64_t m0, int64_t rows, int64_t col0) {
    const int64_t c0 = col0 / 2;  // this group's first gate (and up) column
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < 16; j += kW) {
        Vec gate = Vec::loadu(acc + r * 32 + j), up = Vec::loadu(acc + r * 32 + 16 + j);
        if (bp) {
          gate = gate + Vec::loadu(bp + c0 + j);
          up = up + Vec::loadu(bp + inner + c0 + j);
        }
        const Vec g = round_to<at::BFloat16>(gate), u = round_to<at::BFloat16>(up);
        const Vec v = g / (Vec(1.0f) + g.neg().exp_u20()) * u;  // silu_and_mul's bf16 path
        store_as(v, o + (m0 + r) * inner + c0 + j);
      }
    }
  };
  gemm::run<false>(static_cast<const char*>(xa.data_ptr()), m, xa.size(1) * 2,
                   static_cast<const char*>(packed.data_ptr()), groups, kblocks, epilogue);
#endif
  return out;
}

// W8A8 GEMM inputs as the epilogues read them: x padded to whole k-steps, scales and bias
// in float32 (the tensors own the memory the pointers address).
struct Int8Operands {
  at::Tensor xa, xs, ws, b;
  const float *xsp, *wsp, *bp;
  Int8Operands(const at::Tensor& x, const at::Tensor& x_scale, const at::Tensor& w_scale,
               const std::optional<at::Tensor>& bias, int64_t kblocks)
      : xa(padded_rows(x, kblocks * 64)),
        xs(x_scale.to(at::kFloat).contiguous()),
        ws(w_scale.to(at::kFloat).contiguous()),
        b(bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor()),
        xsp(xs.data_ptr<float>()),
        wsp(ws.data_ptr<float>()),
        bp(b.defined() ? b.data_ptr<float>() : nullptr) {}
};

at::Tensor packed_linear_int8(const at::Tensor& x, const at::Tensor& x_scale,
                              const at::Tensor& packed, const at::Tensor& w_scale, int64_t n,
                              const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  const int64_t kblocks = check_packed(x, packed, at::kChar);
  const int64_t m = x.size(0), groups = packed.size(0);
  TORCH_CHECK(groups * kGroupCols >= n, "x / packed weight mismatch");
  at::Tensor out = at::empty({m, n}, x.options().dtype(out_dtype));
  if (m == 0) return out;
#ifdef HEADRACE_GEMM
  const Int8Operands ops(x, x_scale, w_scale, bias, kblocks);
  const float *xsp = ops.xsp, *wsp = ops.wsp, *bp = ops.bp;
  HEADRACE_DISPATCH_FLOAT(out_dtype, "packed_linear_int8", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    auto epilogue = [&](const float* acc_f, int64_t m0, int64_t rows, int64_t col0) {
      const int32_t* acc = reinterpret_cast<const int32_t*>(acc_f);
      const int64_t cols = std::min<int64_t>(kGroupCols, n - col0);
      for (int64_t r = 0; r < rows; ++r) {
        const Vec s(xsp[m0 + r]);
        for (int64_t c = 0; c < cols; c += kW) {
          const int64_t count = std::min(kW, cols - c);
          // The reference's order: (acc * x_scale) * w_scale, then + bias.
          Vec v = int32_to_float(acc + r * 32 + c, count) * s * Vec::loadu(wsp + col0 + c, count);
          if (bp) v = v + Vec::loadu(bp + col0 + c, count);
          store_as(v, o + (m0 + r) * n + col0 + c, count);
        }
      }
    };
    gemm::run<true>(static_cast<const char*>(ops.xa.data_ptr()), m, ops.xa.size(1),
                    static_cast<const char*>(packed.data_ptr()), groups, kblocks, epilogue);
  });
#endif
  return out;
}

// W8A8's gate_up projection and silu in one GEMM (packed as for packed_linear_silu_bf16): the
// values of packed_linear_int8 then silu_and_mul (gate and up rounded to out_dtype first; the
// weight scales and bias stay in gate-then-up order).
at::Tensor packed_linear_int8_silu(const at::Tensor& x, const at::Tensor& x_scale,
                                   const at::Tensor& packed, const at::Tensor& w_scale,
                                   int64_t inner, const std::optional<at::Tensor>& bias,
                                   at::ScalarType out_dtype) {
  const int64_t kblocks = check_packed(x, packed, at::kChar);
  const int64_t m = x.size(0), groups = packed.size(0);
  TORCH_CHECK(inner % 16 == 0 && groups * kGroupCols == 2 * inner, "packed: 2 * inner columns");
  at::Tensor out = at::empty({m, inner}, x.options().dtype(out_dtype));
  if (m == 0) return out;
#ifdef HEADRACE_GEMM
  const Int8Operands ops(x, x_scale, w_scale, bias, kblocks);
  const float *xsp = ops.xsp, *wsp = ops.wsp, *bp = ops.bp;
  HEADRACE_DISPATCH_FLOAT(out_dtype, "packed_linear_int8_silu", [&] {
    using T = scalar_t;
    T* o = out.data_ptr<T>();
    auto epilogue = [&](const float* acc_f, int64_t m0, int64_t rows, int64_t col0) {
      const int32_t* acc = reinterpret_cast<const int32_t*>(acc_f);
      const int64_t c0 = col0 / 2;  // this group's first gate (and up) column
      for (int64_t r = 0; r < rows; ++r) {
        const Vec s(xsp[m0 + r]);
        for (int64_t j = 0; j < 16; j += kW) {
          const int64_t c = c0 + j;
          // The reference's order: (acc * x_scale) * w_scale, then + bias.
          Vec gate = int32_to_float(acc + r * 32 + j) * s * Vec::loadu(wsp + c);
          Vec up = int32_to_float(acc + r * 32 + 16 + j) * s * Vec::loadu(wsp + inner + c);
          if (bp) {
            gate = gate + Vec::loadu(bp + c);
            up = up + Vec::loadu(bp + inner + c);
          }
          const Vec g = round_to<T>(gate), u = round_to<T>(up);
          Vec v;
          if constexpr (std::is_same_v<T, float>) {  // silu_and_mul's float32 path (1-ulp exp)
            v = g / (Vec(1.0f) + g.neg().exp()) * u;
          } else {
            v = g / (Vec(1.0f) + g.neg().exp_u20()) * u;
          }
          store_as(v, o + (m0 + r) * inner + c);
        }
      }
    };
    gemm::run<true>(static_cast<const char*>(ops.xa.data_ptr()), m, ops.xa.size(1),
                    static_cast<const char*>(packed.data_ptr()), groups, kblocks, epilogue);
  });
#endif
  return out;
}

// Which driver `packed_linear_*` run on: "amx", "avx512" (VNNI + BF16 dot products),
// "avx512vnni" (VNNI for int8, FMAs on widened bf16: CPUs without AVX512-BF16 or with a slow
// vdpbf16ps, gemm::bf16_on_fma), "avx2" (FMA and vpmaddubsw) or "".
std::string gemm_kernel() {
  if (gemm::amx_ready()) return "amx";
#ifdef HEADRACE_AVX512_DOT
  return gemm::bf16_on_fma() ? "avx512vnni" : "avx512";
#endif
  return gemm::avx2_ready() ? "avx2" : "";
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(headrace_cpu, m) {
  m.def("gemm_kernel() -> str", &gemm_kernel);
  m.def("pack_bf16(Tensor weight) -> Tensor");
  m.def("pack_int8(Tensor weight) -> Tensor");
  m.def("packed_linear_bf16(Tensor x, Tensor packed, int n, Tensor? bias=None) -> Tensor");
  m.def("packed_linear_silu_bf16(Tensor x, Tensor packed, int inner, Tensor? bias=None) -> Tensor");
  m.def(
      "packed_linear_int8_silu(Tensor x, Tensor x_scale, Tensor packed, Tensor w_scale, int inner, "
      "Tensor? bias, ScalarType out_dtype) -> Tensor");
  m.def(
      "packed_linear_int8(Tensor x, Tensor x_scale, Tensor packed, Tensor w_scale, int n, "
      "Tensor? bias, ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(headrace_cpu, CPU, m) {
  m.impl("pack_bf16", &pack_bf16);
  m.impl("pack_int8", &pack_int8);
  m.impl("packed_linear_bf16", &packed_linear_bf16);
  m.impl("packed_linear_silu_bf16", &packed_linear_silu_bf16);
  m.impl("packed_linear_int8", &packed_linear_int8);
  m.impl("packed_linear_int8_silu", &packed_linear_int8_silu);
}

}  // namespace headrace_cpu
