"""Quantized projections (W8A8, W4A16): the modules, the in-place swap, and the checkpoint format.

Only the four fused projections of each decoder layer are quantized (they hold ~80% of
SmolLM2's weights); the math lives in `ops.quant`, which picks the CPU or CUDA path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ops.quant import (
    Int4Weight,
    Int8Weight,
    quantize_weight_int4,
    quantize_weight_int8,
    w4a16_gemm,
    w8a8_linear,
)
from worker.models.llama import LlamaForCausalLM

SCHEMES = ("w8a8", "w4a16")
FORMAT_VERSION = 1
DEFAULT_GROUP_SIZE = 128
# Per decoder layer, relative to `layers.{i}`.
PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


class W8A8Linear(nn.Module):
    """int8 weight per output channel, int8 activations per token (dynamic), int32 accumulation.

    Buffers: qweight [N, K] int8; scale [N] float32; bias [N] (model dtype) or None;
    smooth [K] float32 or None — SmoothQuant: the weight was quantized as `W * smooth`, so
    the input is divided by `smooth` first and `(x / s) @ (W * s)ᵀ = x @ Wᵀ`.
    NOTE: scale and smooth must stay float32; don't `.to(dtype)` the module (`.to(device)` is fine).
    """

    def __init__(
        self, weight: Int8Weight, bias: torch.Tensor | None, smooth: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.qweight.shape
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scale", weight.scale)
        self.register_buffer("bias", bias)
        self.register_buffer("smooth", smooth)

    @classmethod
    def from_linear(cls, linear: nn.Linear, smooth: torch.Tensor | None = None) -> W8A8Linear:
        weight = _smoothed(linear.weight, smooth)
        return cls(quantize_weight_int8(weight), _bias(linear), _smooth(smooth, linear))

    @classmethod
    def empty_like(cls, linear: nn.Linear, smoothed: bool) -> W8A8Linear:
        """Uninitialized buffers shaped for `linear` (on its device: meta when loading)."""
        (n, k), device = linear.weight.shape, linear.weight.device
        weight = Int8Weight(
            torch.empty(n, k, dtype=torch.int8, device=device),
            torch.empty(n, dtype=torch.float32, device=device),
        )
        smooth = torch.empty(k, dtype=torch.float32, device=device) if smoothed else None
        return cls(weight, _bias(linear), smooth)

    def quantized_weight(self) -> Int8Weight:
        return Int8Weight(self.qweight, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, K] float (fp32/fp16/bf16) → [T, N] in x.dtype."""
        weight = self.quantized_weight()
        if self.smooth is None:
            return w8a8_linear(x, weight, self.bias)
        # Divide in float32: per-token quantization reads float32 anyway, so this adds no rounding.
        return w8a8_linear(x.float() / self.smooth, weight, self.bias).to(x.dtype)


class W4A16Linear(nn.Module):
    """int4 weight (asymmetric, groups of `group_size` along K), activations kept in x.dtype.

    Buffers: packed [N, K // 2] uint8; scales [N, ceil(K / group_size)] float32; zeros
    [N, ceil(K / group_size)] uint8; bias [N] or None; smooth [K] float32 or None (as in
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
    ) -> W4A16Linear:
        # Plain min/max round-to-nearest. NOTE: ops.quant.quantize_weight_int4_clipped (MSE
        # clipping search) lowers each group's error but measured *worse* end to end on
        # SmolLM2 (top-1 0.52 on the eval text), so it is not the default.
        weight = quantize_weight_int4(_smoothed(linear.weight, smooth), group_size)
        return cls(weight, _bias(linear), _smooth(smooth, linear))

    @classmethod
    def empty_like(cls, linear: nn.Linear, smoothed: bool, group_size: int) -> W4A16Linear:
        """Uninitialized buffers shaped for `linear` (on its device: meta when loading)."""
        (n, k), device = linear.weight.shape, linear.weight.device
        groups = -(-k // group_size)
        weight = Int4Weight(
            torch.empty(n, k // 2, dtype=torch.uint8, device=device),
            torch.empty(n, groups, dtype=torch.float32, device=device),
            torch.empty(n, groups, dtype=torch.uint8, device=device),
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


def _smooth(smooth: torch.Tensor | None, linear: nn.Linear) -> torch.Tensor | None:
    if smooth is None:
        return None
    if smooth.shape != (linear.in_features,):
        raise ValueError(f"smooth must be [{linear.in_features}], got {tuple(smooth.shape)}")
    return smooth.to(device=linear.weight.device, dtype=torch.float32).contiguous()


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    # A fresh tensor (clone), so the float Linear can be freed; empty_like on meta stays meta.
    return None if linear.bias is None else linear.bias.detach().clone()


@dataclass(frozen=True)
class QuantizationSpec:
    """What `headrace quantize` records in config.json under "headrace_quantization".

    group_size: W4A16 only (None for W8A8). smoothquant_alpha: None when not calibrated
    (then no module has a `smooth` buffer); otherwise every module has one. gptq: W4A16
    weights from GPTQ (provenance only: the tensors are the same format either way).
    """

    scheme: str
    group_size: int | None = None
    smoothquant_alpha: float | None = None
    gptq: bool = False

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"quantization scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if (self.scheme == "w4a16") != (self.group_size is not None):
            raise ValueError("group_size is set for w4a16 and only for w4a16")
        if self.gptq and self.scheme != "w4a16":
            raise ValueError("gptq applies to w4a16 only")

    def to_json(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "group_size": self.group_size,
            "smoothquant_alpha": self.smoothquant_alpha,
            "gptq": self.gptq,
            "format_version": FORMAT_VERSION,
        }

    @classmethod
    def from_hf_config(cls, config: Any) -> QuantizationSpec | None:
        """The spec recorded in a model's config, or None for an ordinary float checkpoint."""
        meta = getattr(config, "headrace_quantization", None)
        if meta is None:
            return None
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"quantized checkpoint format {meta.get('format_version')!r} is not supported "
                f"(this headrace reads format {FORMAT_VERSION}); re-run `headrace quantize`"
            )
        return cls(
            meta["scheme"],
            meta.get("group_size"),
            meta.get("smoothquant_alpha"),
            bool(meta.get("gptq", False)),
        )


def quantizable_linears(model: LlamaForCausalLM) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of the four projections of every layer, e.g. "layers.0.mlp.down_proj"."""
    for i, layer in enumerate(model.layers):
        for proj in PROJECTIONS:
            yield f"layers.{i}.{proj}", layer.get_submodule(proj)


def quantize_model(
    model: LlamaForCausalLM,
    scheme: str,
    smooth: dict[str, torch.Tensor] | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> None:
    """Replace every layer's projections by quantized modules, in place; frees the float weights.

    smooth: SmoothQuant factors by `quantizable_linears` name ([K] each); all or none.
    """
    # The embeddings and lm_head stay in the model dtype: SmolLM2 ties lm_head to the
    # embedding table (quantizing one quantizes both), and the logits are the most
    # quantization-sensitive output of the model (they pick the token).
    if scheme not in SCHEMES:
        raise ValueError(f"quantization scheme must be one of {SCHEMES}, got {scheme!r}")
    for name, linear in list(quantizable_linears(model)):
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is already quantized")
        s = smooth[name] if smooth is not None else None
        if scheme == "w8a8":
            new: nn.Module = W8A8Linear.from_linear(linear, s)
        else:
            new = W4A16Linear.from_linear(linear, s, group_size)
        _replace(model, name, new)  # the Linear (and its float weight) has no other reference


def convert_for_runtime(model: LlamaForCausalLM, spec: QuantizationSpec) -> None:
    """Swap in uninitialized quantized modules to load a quantized checkpoint into (on meta)."""
    smoothed = spec.smoothquant_alpha is not None
    for name, linear in list(quantizable_linears(model)):
        assert isinstance(linear, nn.Linear)
        if spec.scheme == "w8a8":
            new: nn.Module = W8A8Linear.empty_like(linear, smoothed)
        else:
            assert spec.group_size is not None
            new = W4A16Linear.empty_like(linear, smoothed, spec.group_size)
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
