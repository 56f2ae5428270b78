"""Quantized linear-layer ops, W8A8: int8 weights, per-token int8 activations (int4 W4A16
weights: `ops.quant_int4`).

W8A8: weights symmetric int8 with one scale per output channel; activations symmetric int8
with one scale per token, computed on the fly (after the SmoothQuant division and block
Hadamard rotation the weight was quantized with, if any); int32 accumulation; the scales
(and bias) are applied in the epilogue: `out = (a_q @ b_qᵀ) * a_scale[:, None] * b_scale`.

Rounding is half-up (`floor(x + 0.5)`) everywhere, on CPU and in the Triton kernels, so the two
agree bit for bit away from float rounding ties. CPU paths use torch (`torch._int_mm` for the
int8 GEMM); CUDA tensors go to the kernels in `kernels/`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ops.cpu_kernels import use_cpu_kernels
from ops.dispatch import use_triton
from ops.linear import gemm_kernel, interleave_gate_up
from ops.rotation import hadamard, rotate

INT8_MAX = 127
# Floor on every quantization scale, so all-zero rows quantize to 0 instead of dividing by 0.
# A power of two is exact in float16, bfloat16 and float32 scale storage alike.
MIN_SCALE = 2.0**-20


@dataclass(frozen=True)
class Int8Weight:
    """W8A8 weight. qweight: [N, K] int8; scale: [N] float32 (per output channel)."""

    qweight: torch.Tensor
    scale: torch.Tensor


@functools.cache
def cpu_has_int8_gemm() -> bool:
    """Whether this CPU has int8 dot-product instructions (VNNI or AMX) for torch._int_mm."""
    return torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported()


def round_half_up(x: torch.Tensor) -> torch.Tensor:
    """The rounding of every quantizer here (the kernels use the same)."""
    return torch.floor(x + 0.5)


def quantize_symmetric(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dim. x: [..., K] → (int8 [..., K], float32 scale [...])."""
    x32 = x.float()
    scale = (x32.abs().amax(dim=-1) / INT8_MAX).clamp_min(MIN_SCALE)
    q = round_half_up(x32 / scale.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def quantize_weight_int8(weight: torch.Tensor) -> Int8Weight:
    """weight: [N, K] float → per-output-channel symmetric int8."""
    qweight, scale = quantize_symmetric(weight)
    return Int8Weight(qweight.contiguous(), scale.contiguous())


def per_token_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token int8. x: [M, K] float → (int8 [M, K], float32 scale [M])."""
    if use_triton(x):
        from kernels.rmsnorm_quant import per_token_quant as kernel

        return kernel(x)
    return quantize_symmetric(x)


def quantize_activations(
    x: torch.Tensor, smooth: torch.Tensor | None = None, rotation: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """W8A8's input as served: per-token int8 of `rotate(x / smooth, rotation)`, in float32.

    x: [M, K] float; smooth: [K] float32 (SmoothQuant factors) or None; rotation: block
    Hadamard block size (1 = none) → (int8 [M, K], float32 scale [M]).
    """
    if use_cpu_kernels(x) and x.stride(-1) == 1:
        # One pass per row (FWHT for the rotation); the torch path below makes five.
        return torch.ops.headrace_cpu.quantize_rows(x, smooth, rotation)
    if smooth is None and rotation == 1:
        return per_token_quant(x)
    # The kernel's tl.dot needs blocks of >= 16; smaller ones (K with few factors of 2) stay
    # in torch on every device.
    if use_triton(x) and (rotation == 1 or rotation >= 16):
        from kernels.rmsnorm_quant import smooth_rotate_quant as kernel

        h = hadamard(rotation, x.device) if rotation > 1 else None
        return kernel(x, None if smooth is None else smooth.float().contiguous(), h)
    x32 = x.float()
    if smooth is not None:
        x32 = x32 / smooth.float()
    if rotation > 1:
        x32 = rotate(x32, rotation)
    return quantize_symmetric(x32)


def rmsnorm_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm then per-token int8, all in float32 (no rounding to x.dtype in between).

    x: [M, K] float; weight: [K] → (int8 [M, K], float32 scale [M]).
    """
    if use_triton(x):
        from kernels.rmsnorm_quant import rmsnorm_quant as kernel

        return kernel(x, weight, eps)
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return quantize_symmetric(normed)


def packed_int8_weight(qweight: torch.Tensor) -> torch.Tensor | None:
    """qweight: [N, K] int8 → our kernel's packed copy of it (`int8_gemm(..., packed=)`),
    where our CPU GEMM runs (`ops.linear.gemm_kernel`); None elsewhere."""
    if qweight.device.type != "cpu" or not gemm_kernel():
        return None
    return torch.ops.headrace_cpu.pack_int8(qweight)


def packed_int8_gated(qweight: torch.Tensor) -> torch.Tensor | None:
    """qweight: [2I, K] int8 of a gate_up projection → our kernel's packed copy with 16 gate
    and the matching 16 up columns per 32-column group (`w8a8_linear_silu`), where our CPU
    GEMM runs; None elsewhere."""
    if qweight.device.type != "cpu" or not gemm_kernel() or qweight.shape[0] % 32:
        return None
    return torch.ops.headrace_cpu.pack_int8(interleave_gate_up(qweight))


def int8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """`(a @ bᵀ) * a_scale[:, None] * b_scale[None, :] + bias` with int32 accumulation.

    a: [M, K] int8; a_scale: [M] float32; b: [N, K] int8 (nn.Linear layout); b_scale: [N]
    float32; bias: [N] or None; packed: `packed_int8_weight(b)` or None → [M, N] out_dtype.
    """
    if packed is not None:
        return torch.ops.headrace_cpu.packed_linear_int8(
            a, a_scale, packed, b_scale, b.shape[0], bias, out_dtype
        )
    if use_triton(a):
        from kernels.int8_gemm import int8_gemm as kernel

        return kernel(a, a_scale, b, b_scale, bias, out_dtype)
    # Without VNNI/AMX, torch._int_mm runs a scalar loop (~10-100x slower than a float32
    # GEMM). int8 products and their sums are exact in float32 while |sum| < 2^24, which
    # K * 127^2 only passes for K > 1040, and then by at most an ulp per addition.
    use_int = cpu_has_int8_gemm()
    acc = torch._int_mm(a, b.t()).float() if use_int else a.float() @ b.float().t()  # [M, N]
    out = acc * a_scale.float()[:, None] * b_scale.float()[None, :]
    if bias is not None:
        out += bias.float()
    return out.to(out_dtype)


def w8a8_linear(
    x: torch.Tensor,
    weight: Int8Weight,
    bias: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    rotation: int = 1,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: [..., K] fp16/bf16/fp32 → [..., N] in x.dtype; x is quantized per token on the fly
    (after the division by `smooth` and the block rotation the weight was quantized with).
    packed: `packed_int8_weight(weight.qweight)`, or None."""
    x2d = x.reshape(-1, x.shape[-1])
    x_q, x_scale = quantize_activations(x2d, smooth, rotation)
    out = int8_gemm(x_q, x_scale, weight.qweight, weight.scale, bias, x.dtype, packed)
    return out.view(*x.shape[:-1], out.shape[-1])


def w8a8_linear_silu(
    x: torch.Tensor,
    weight: Int8Weight,
    bias: torch.Tensor | None,
    smooth: torch.Tensor | None,
    rotation: int,
    gated: torch.Tensor,
) -> torch.Tensor:
    """silu(gate) * up of `w8a8_linear(x, weight, ...)` for a [2I, K] gate_up weight, in one
    GEMM (gated: `packed_int8_gated(weight.qweight)`): x [T, K] → [T, I] in x.dtype, the
    same values as the two steps."""
    x_q, x_scale = quantize_activations(x, smooth, rotation)
    inner = weight.qweight.shape[0] // 2
    return torch.ops.headrace_cpu.packed_linear_int8_silu(
        x_q, x_scale, gated, weight.scale, inner, bias, x.dtype
    )
