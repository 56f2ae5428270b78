// The decoder layers of a decode-only step in one call: the kernels of this directory, in the
// order and with the arguments worker/models/llama.py gives them one Python call at a time.
//
// Why: a decode step of a small model is a few hundred short kernel calls. Through Python each
// costs a module call, an ops.* wrapper and the dispatcher's argument parsing, ~2 ms of a
// 13 ms SmolLM2 step at batch 1 on 2 cores (a 30-layer model with tiny matrices spends
// 2.7 ms per step in its forward). Here the same kernels are called through the dispatcher's
// typed (unboxed) path from one loop, so the step is the kernels' own time. The values are
// those of the Python path bit for bit (same kernels, same inputs): tests compare the two.
//
// Inputs, per layer (worker/models/fused_decode.py builds them; None where absent):
//   weights[kWeights * layer + ...]: input_layernorm, post_attention_layernorm, q_norm, k_norm
//     (Qwen3), then for qkv, o, gate_up, down: packed weight, bias, weight scale, smooth. A
//     projection with a weight scale is W8A8 (x quantized per token by quantize_rows, then
//     packed_linear_int8[_silu]); without one it is bf16 (packed_linear_[silu_]bf16). gate_up's
//     weight is packed gate/up interleaved, and its activation runs in the GEMM's epilogue.
//   ints[kInts * layer + ...]: (output columns, Hadamard rotation) of qkv, o, gate_up (its
//     output columns: the intermediate size), down.
//   caches[4 * layer + ...]: key, value, key scales, value scales (int8 caches only).
#include "common.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace headrace_cpu {
namespace {

constexpr int64_t kWeights = 20;  // per layer, see the file comment
constexpr int64_t kInts = 8;
constexpr int64_t kProjections = 4;  // first weight index of each projection: 4 + 4 * p

using OptTensor = std::optional<at::Tensor>;

// A registered headrace_cpu op as a typed C++ handle (looked up once).
template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

struct Kernels {
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, double)> rms_norm =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("headrace_cpu::rms_norm");
  c10::TypedOperatorHandle<void(at::Tensor&, at::Tensor&, const at::Tensor&, double)> add_norm =
      op<void(at::Tensor&, at::Tensor&, const at::Tensor&, double)>(
          "headrace_cpu::fused_add_rms_norm");
  c10::TypedOperatorHandle<void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&)>
      rotary = op<void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&)>("headrace_cpu::rotary_embedding");
  c10::TypedOperatorHandle<void(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                                const at::Tensor&, const OptTensor&, const OptTensor&)>
      cache = op<void(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                      const at::Tensor&, const OptTensor&, const OptTensor&)>(
          "headrace_cpu::reshape_and_cache");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, const at::Tensor&, double,
                                      const OptTensor&, const OptTensor&)>
      attention = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, double, const OptTensor&,
                                const OptTensor&)>("headrace_cpu::paged_decode_attention");
  using Bf16Sig = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const OptTensor&);
  c10::TypedOperatorHandle<Bf16Sig> linear_bf16 = op<Bf16Sig>("headrace_cpu::packed_linear_bf16");
  c10::TypedOperatorHandle<Bf16Sig> silu_bf16 = op<Bf16Sig>("headrace_cpu::packed_linear_silu_bf16");
  using Int8Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, int64_t, const OptTensor&, at::ScalarType);
  c10::TypedOperatorHandle<Int8Sig> linear_int8 = op<Int8Sig>("headrace_cpu::packed_linear_int8");
  c10::TypedOperatorHandle<Int8Sig> silu_int8 = op<Int8Sig>("headrace_cpu::packed_linear_int8_silu");
  using QuantSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const OptTensor&, int64_t);
  c10::TypedOperatorHandle<QuantSig> quantize = op<QuantSig>("headrace_cpu::quantize_rows");
};

const Kernels& kernels() {
  static const Kernels k;  // after every op is registered: the library is loaded by then
  return k;
}

// One projection of `layer` (p: 0 qkv, 1 o, 2 gate_up with its silu, 3 down): x [T, K] → [T, N].
at::Tensor project(const Kernels& k, const c10::List<OptTensor>& weights,
                   at::IntArrayRef ints, int64_t layer, int64_t p,
                   const at::Tensor& x) {
  const int64_t w = kWeights * layer + kProjections + 4 * p;
  const int64_t n = ints[kInts * layer + 2 * p], rotation = ints[kInts * layer + 2 * p + 1];
  const at::Tensor packed = weights.get(w).value();
  const OptTensor bias = weights.get(w + 1), w_scale = weights.get(w + 2);
  const bool gated = p == 2;
  if (!w_scale.has_value()) {
    return gated ? k.silu_bf16.call(x, packed, n, bias) : k.linear_bf16.call(x, packed, n, bias);
  }
  const auto [codes, scales] = k.quantize.call(x, weights.get(w + 3), rotation);
  const auto& linear = gated ? k.silu_int8 : k.linear_int8;
  return linear.call(codes, scales, packed, *w_scale, n, bias, x.scalar_type());
}

// Qwen3's per-head RMSNorm of q or k: [T, heads, D] → a new [T, heads, D].
at::Tensor head_norm(const Kernels& k, const at::Tensor& x, const at::Tensor& weight, double eps) {
  return k.rms_norm.call(x.reshape({-1, x.size(2)}), weight, eps).view(x.sizes());
}

// x: [T, hidden] (the embeddings of a decode step's tokens) → (the last layer's MLP output,
// the residual stream before it), as LlamaForCausalLM's layer loop returns them.
std::tuple<at::Tensor, at::Tensor> decode_layers(
    const at::Tensor& embeddings, const at::Tensor& positions, const at::Tensor& cos,
    const at::Tensor& sin, const c10::List<OptTensor>& weights, at::IntArrayRef ints,
    const c10::List<OptTensor>& caches, const at::Tensor& slot_mapping,
    const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t num_heads,
    int64_t num_kv_heads, int64_t head_dim, double eps, double scale) {
  const int64_t layers = static_cast<int64_t>(weights.size()) / kWeights;
  TORCH_CHECK(layers * kWeights == static_cast<int64_t>(weights.size()) && layers > 0,
              "weights: ", kWeights, " entries per layer");
  TORCH_CHECK(static_cast<int64_t>(ints.size()) == kInts * layers, "ints: ", kInts, " per layer");
  TORCH_CHECK(static_cast<int64_t>(caches.size()) == 4 * layers, "caches: 4 per layer");
  TORCH_CHECK(embeddings.dim() == 2, "x: [T, hidden]");
  const Kernels& k = kernels();
  at::Tensor x = embeddings;
  const int64_t t = embeddings.size(0), q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  at::Tensor residual;
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t w = kWeights * l;
    at::Tensor h;
    if (l == 0) {
      residual = x;
      h = k.rms_norm.call(x, weights.get(w).value(), eps);
    } else {
      k.add_norm.call(x, residual, weights.get(w).value(), eps);  // x ← norm(x + residual)
      h = x;
    }
    const at::Tensor qkv = project(k, weights, ints, l, 0, h);
    at::Tensor q = qkv.narrow(1, 0, q_size).view({t, num_heads, head_dim});
    at::Tensor key = qkv.narrow(1, q_size, kv_size).view({t, num_kv_heads, head_dim});
    const at::Tensor value = qkv.narrow(1, q_size + kv_size, kv_size).view({t, num_kv_heads, head_dim});
    const OptTensor q_norm = weights.get(w + 2), k_norm = weights.get(w + 3);
    if (q_norm.has_value() && k_norm.has_value()) {
      q = head_norm(k, q, *q_norm, eps);
      key = head_norm(k, key, *k_norm, eps);
    }
    k.rotary.call(q, key, positions, cos, sin);
    at::Tensor key_cache = caches.get(4 * l).value(), value_cache = caches.get(4 * l + 1).value();
    const OptTensor key_scale = caches.get(4 * l + 2), value_scale = caches.get(4 * l + 3);
    k.cache.call(key, value, key_cache, value_cache, slot_mapping, key_scale, value_scale);
    const at::Tensor o = k.attention.call(q, key_cache, value_cache, block_tables, context_lens,
                                          scale, key_scale, value_scale);
    at::Tensor attn = project(k, weights, ints, l, 1, o.reshape({t, q_size}));
    k.add_norm.call(attn, residual, weights.get(w + 1).value(), eps);  // attn ← post-norm
    x = project(k, weights, ints, l, 3, project(k, weights, ints, l, 2, attn));
  }
  return {x, residual};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(headrace_cpu, m) {
  m.def(
      "decode_layers(Tensor x, Tensor positions, Tensor cos, Tensor sin, Tensor?[] weights, "
      "int[] ints, Tensor?[] caches, Tensor slot_mapping, Tensor block_tables, "
      "Tensor context_lens, int num_heads, int num_kv_heads, int head_dim, float eps, "
      "float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(headrace_cpu, CPU, m) { m.impl("decode_layers", &decode_layers); }

}  // namespace headrace_cpu
