"""Quantized projections (W8A8, W4A16): the modules, the in-place swap, the stored tensors.

Only the four fused projections of each decoder layer are quantized (they hold ~80% of
SmolLM2's weights); the math lives in `ops.quant`, which picks the CPU or CUDA path.
Equivalence transforms of a projection's input (SmoothQuant's per-channel `smooth`, W8A8's
block Hadamard `rotation`) are folded into the stored weight and applied to `x` at run time.

NOTE: ~320 lines: the modules, the swap and the stored tensors change together.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ops.activation import silu_and_mul
from ops.decode_layers import ProjectionOperands
from ops.linear import PackedCopy
from ops.quant import (
    Int8Weight,
    packed_int8_gated,
    packed_int8_weight,
    quantize_weight_int8,
    w8a8_linear,
    w8a8_linear_silu,
)
from ops.quant_int4 import Int4Weight, quantize_weight_int4, w4a16_gemm
from ops.rotation import rotate, rotate_hessian, rotation_block
from worker.models.gptq import DEFAULT_GROUP_SIZE, gptq_quantize_int4, gptq_quantize_int8
from worker.models.llama import LlamaForCausalLM
from worker.models.quant_spec import QuantizationSpec

# Per decoder layer, relative to `layers.{i}`.
PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


class W8A8Linear(nn.Module):
    """int8 weight per output channel, int8 activations per token (dynamic), int32 accumulation.

    Buffers: qweight [N, K] int8; scale [N] float32; bias [N] (model dtype) or None;
    smooth [K] float32 or None. `rotation`: the block of the Hadamard rotation R (0: none).
    The stored weight is `(W * smooth) R`; the input becomes `(x / smooth) R` before its
    per-token quantization, so `((x / s) R) @ ((W * s) R)ᵀ = x @ Wᵀ` (R R = I).
    NOTE: scale and smooth must stay float32; don't `.to(dtype)` the module (`.to(device)` is fine).
    """

    def __init__(
        self,
        weight: Int8Weight,
        bias: torch.Tensor | None,
        smooth: torch.Tensor | None,
        rotation: int = 0,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.qweight.shape
        if rotation and self.in_features % rotation:
            raise ValueError(f"K = {self.in_features} is not a multiple of rotation {rotation}")
        self.rotation = rotation
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scale", weight.scale)
        self.register_buffer("bias", bias)
        self.register_buffer("smooth", smooth)
        self.packed = PackedCopy(packed_int8_weight)
        self.gated = PackedCopy(packed_int8_gated)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        smooth: torch.Tensor | None = None,
        max_rotation: int = 0,
        hessian: torch.Tensor | None = None,
    ) -> W8A8Linear:
        """Quantize `linear` (round to nearest, or GPTQ given its input Hessian [K, K]),
        smoothed by `smooth` and rotated by the largest Hadamard block ≤ `max_rotation`
        that divides K (0: no rotation)."""
        rotation = _rotation(linear.in_features, max_rotation)
        weight = _smoothed(linear.weight, smooth)
        if rotation:
            weight = rotate(weight, rotation)
        if hessian is None:
            quantized = quantize_weight_int8(weight)
        else:
            hessian = _smoothed_hessian(hessian, smooth)
            if rotation:
                hessian = rotate_hessian(hessian, rotation)
            quantized = gptq_quantize_int8(weight, hessian)
        return cls(quantized, _bias(linear), _smooth(smooth, linear), rotation)

    @classmethod
    def empty_like(cls, linear: nn.Linear, smoothed: bool, max_rotation: int = 0) -> W8A8Linear:
        """Uninitialized buffers shaped for `linear` (on its device: meta when loading)."""
        (n, k), device = linear.weight.shape, linear.weight.device
        weight = Int8Weight(
            torch.empty(n, k, dtype=torch.int8, device=device),
            torch.empty(n, dtype=torch.float32, device=device),
        )
        smooth = torch.empty(k, dtype=torch.float32, device=device) if smoothed else None
        return cls(weight, _bias(linear), smooth, _rotation(k, max_rotation))

    def quantized_weight(self) -> Int8Weight:
        return Int8Weight(self.qweight, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, K] float (fp32/fp16/bf16) → [T, N] in x.dtype."""
        return w8a8_linear(
            x,
            self.quantized_weight(),
            self.bias,
            self.smooth,
            max(1, self.rotation),
            self.packed.get(self.qweight),
        )

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        """For a gate_up projection (output rows: gate, then up): silu(gate) * up of forward(x),
        in one GEMM where there is one. x: [T, K] → [T, N / 2] in x.dtype."""
        gated = None
        if not (self._forward_pre_hooks or self._forward_hooks) and x.dim() == 2:
            gated = self.gated.get(self.qweight)
        if gated is None:
            return silu_and_mul(self(x))
        rotation = max(1, self.rotation)
        return w8a8_linear_silu(x, self.quantized_weight(), self.bias, self.smooth, rotation, gated)

    def decode_operands(self, dtype: torch.dtype, gated: bool = False) -> ProjectionOperands | None:
        """This projection as `ops.decode_layers` runs it (quantize_rows, then our packed int8
        GEMM; gated: gate/up interleaved, silu in the epilogue); None where forward / silu
        would not run that kernel (no packed copy on this CPU, hooks)."""
        if self._forward_pre_hooks or self._forward_hooks:
            return None
        packed = (self.gated if gated else self.packed).get(self.qweight)
        if packed is None:
            return None
        columns = self.out_features // 2 if gated else self.out_features
        rotation = max(1, self.rotation)
        return ProjectionOperands(
            packed, self.qweight, self.bias, self.scale, self.smooth, columns, rotation
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rotation={self.rotation}"


class W4A16Linear(nn.Module):
    """int4 weight (asymmetric, groups of `group_size` along K), activations kept in x.dtype.

    Buffers: packed [N, K // 2] uint8; scales [N, ceil(K / group_size)] float32; zeros
    [N, ceil(K / group_size)] uint8 (integer zero points) or float32 (real ones); bias [N] or None; smooth [K] float32 or None (as in
    W8A8Linear; here x / smooth is rounded back to x.dtype, since the GEMM reads x.dtype).
    """

    def __init__(
        self, weight: Int4Weight, bias: torch.Tensor | None, smooth: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.out_features, weight.in_features
        self.group_size = weight.group_size
        self.register_buffer("packed", weight.packed)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("zeros", weight.zeros)
        self.register_buffer("bias", bias)
        self.register_buffer("smooth", smooth)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        smooth: torch.Tensor | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
        hessian: torch.Tensor | None = None,
        float_zeros: bool = False,
    ) -> W4A16Linear:
        """Quantize `linear`: plain min/max round-to-nearest, or GPTQ given its input
        Hessian [K, K]; integer zero points, or real ones with `float_zeros`."""
        # NOTE: ops.quant_int4.quantize_weight_int4_clipped (MSE clipping search) lowers each
        # group's error but measured *worse* end to end on SmolLM2 (top-1 0.52 on the eval
        # text), so round-to-nearest uses plain min/max.
        weight = _smoothed(linear.weight, smooth)
        if hessian is None:
            quantized = quantize_weight_int4(weight, group_size, float_zeros=float_zeros)
        else:
            hessian = _smoothed_hessian(hessian, smooth)
            quantized = gptq_quantize_int4(weight, hessian, group_size, float_zeros=float_zeros)
        return cls(quantized, _bias(linear), _smooth(smooth, linear))

    @classmethod
    def empty_like(
        cls, linear: nn.Linear, smoothed: bool, group_size: int, float_zeros: bool = False
    ) -> W4A16Linear:
        """Uninitialized buffers shaped for `linear` (on its device: meta when loading)."""
        (n, k), device = linear.weight.shape, linear.weight.device
        groups = -(-k // group_size)
        zeros_dtype = torch.float32 if float_zeros else torch.uint8
        weight = Int4Weight(
            torch.empty(n, k // 2, dtype=torch.uint8, device=device),
            torch.empty(n, groups, dtype=torch.float32, device=device),
            torch.empty(n, groups, dtype=zeros_dtype, device=device),
            group_size,
        )
        smooth = torch.empty(k, dtype=torch.float32, device=device) if smoothed else None
        return cls(weight, _bias(linear), smooth)

    def quantized_weight(self) -> Int4Weight:
        return Int4Weight(self.packed, self.scales, self.zeros, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, K] float (fp16/bf16; fp32 too) → [T, N] in x.dtype."""
        if self.smooth is not None:
            x = (x.float() / self.smooth).to(x.dtype)
        return w4a16_gemm(x, self.quantized_weight(), self.bias)


def _smoothed(weight: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
    """[N, K] → W * smooth (per input channel) in float32, or W unchanged."""
    return weight if smooth is None else weight.float() * smooth.float().to(weight.device)


def _smoothed_hessian(hessian: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
    """Σ xᵀx [K, K] → Σ (x / s)ᵀ(x / s), the Hessian of the input the smoothed weight sees."""
    if smooth is None:
        return hessian
    inv = 1.0 / smooth.float().to(hessian.device)
    return hessian.float() * inv[:, None] * inv[None, :]


def _rotation(in_features: int, max_rotation: int) -> int:
    """The Hadamard block a projection with `in_features` inputs uses (0: none)."""
    block = rotation_block(in_features, max_rotation) if max_rotation else 0
    return block if block > 1 else 0


def _smooth(smooth: torch.Tensor | None, linear: nn.Linear) -> torch.Tensor | None:
    if smooth is None:
        return None
    if smooth.shape != (linear.in_features,):
        raise ValueError(f"smooth must be [{linear.in_features}], got {tuple(smooth.shape)}")
    return smooth.to(device=linear.weight.device, dtype=torch.float32).contiguous()


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    # A fresh tensor (clone), so the float Linear can be freed; empty_like on meta stays meta.
    return None if linear.bias is None else linear.bias.detach().clone()


def quantizable_linears(model: LlamaForCausalLM) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of the four projections of every layer, e.g. "layers.0.mlp.down_proj"."""
    for i, layer in enumerate(model.layers):
        for proj in PROJECTIONS:
            yield f"layers.{i}.{proj}", layer.get_submodule(proj)


def quantize_model(
    model: LlamaForCausalLM,
    spec: QuantizationSpec,
    smooth: dict[str, torch.Tensor] | None = None,
    hessians: dict[str, torch.Tensor] | None = None,
) -> None:
    """Replace every layer's projections by quantized modules, in place; frees the float weights.

    smooth: SmoothQuant factors ([K] each), hessians: GPTQ's input Hessians ([K, K] each,
    of the unsmoothed input), by `quantizable_linears` name; each all or none, and given
    exactly when `spec` asks for them.
    """
    # The embeddings and lm_head stay in the model dtype: SmolLM2 ties lm_head to the
    # embedding table (quantizing one quantizes both), and the logits are the most
    # quantization-sensitive output of the model (they pick the token).
    if (smooth is not None) != (spec.smoothquant_alpha is not None):
        raise ValueError("smoothing factors are given exactly when the spec has an alpha")
    if (hessians is not None) != spec.gptq:
        raise ValueError("Hessians are given exactly when the spec asks for GPTQ")
    for name, linear in list(quantizable_linears(model)):
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is already quantized")
        s = smooth[name] if smooth is not None else None
        h = hessians[name] if hessians is not None else None
        if spec.scheme == "w8a8":
            new: nn.Module = W8A8Linear.from_linear(linear, s, spec.rotation, h)
        else:
            assert spec.group_size is not None
            new = W4A16Linear.from_linear(linear, s, spec.group_size, h, spec.float_zeros)
        _replace(model, name, new)  # the Linear (and its float weight) has no other reference


def convert_for_runtime(model: LlamaForCausalLM, spec: QuantizationSpec) -> None:
    """Swap in uninitialized quantized modules to load a quantized checkpoint into (on meta)."""
    smoothed = spec.smoothquant_alpha is not None
    for name, linear in list(quantizable_linears(model)):
        assert isinstance(linear, nn.Linear)
        if spec.scheme == "w8a8":
            new: nn.Module = W8A8Linear.empty_like(linear, smoothed, spec.rotation)
        else:
            assert spec.group_size is not None
            new = W4A16Linear.empty_like(linear, smoothed, spec.group_size, spec.float_zeros)
        _replace(model, name, new)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def hf_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """Tensors to save, under HF names ("model." prefix, fused projections kept fused), on CPU.

    A tied lm_head is left out (it is the embedding table, as in HF checkpoints).
    """
    tied = model.args.tie_word_embeddings
    state = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        hf_name = name if name.startswith("lm_head.") else f"model.{name}"
        state[hf_name] = tensor.detach().to("cpu").contiguous()
    return state


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (a tied tensor counted once)."""
    seen: dict[int, int] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())
