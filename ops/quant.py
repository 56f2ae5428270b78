"""Quantized linear-layer ops: int8 (W8A8) and int4 (W4A16) weights, per-token int8 activations.

Schemes:
- W8A8: weights symmetric int8 with one scale per output channel; activations symmetric
  int8 with one scale per token, computed on the fly; int32 accumulation; the scales
  (and bias) are applied in the epilogue: `out = (a_q @ b_qᵀ) * a_scale[:, None] * b_scale`.
- W4A16: weights asymmetric int4 in groups of `group_size` along K (the last group may be
  shorter), packed two per byte (even k in the low nibble), dequantized as
  `(q - zero) * scale`; activations stay fp16/bf16.

Rounding is half-up (`floor(x + 0.5)`) everywhere, on CPU and in the Triton kernels, so the two
agree bit for bit away from float rounding ties. CPU paths use torch (`torch._int_mm` for the
int8 GEMM); CUDA tensors go to the kernels in `kernels/`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ops.dispatch import use_triton

INT8_MAX = 127
INT4_MAX = 15
# Floor on every quantization scale, so all-zero rows quantize to 0 instead of dividing by 0.
# A power of two is exact in float16, bfloat16 and float32 scale storage alike.
MIN_SCALE = 2.0**-20


@dataclass(frozen=True)
class Int8Weight:
    """W8A8 weight. qweight: [N, K] int8; scale: [N] float32 (per output channel)."""

    qweight: torch.Tensor
    scale: torch.Tensor


@dataclass(frozen=True)
class Int4Weight:
    """W4A16 weight.

    packed: [N, K // 2] uint8, k = 2i in the low nibble of byte i, k = 2i + 1 in the high one.
    scales: [N, ceil(K / group_size)] float (float32, float16 or bfloat16).
    zeros: [N, ceil(K / group_size)] uint8 in [0, 15].
    """

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int

    @property
    def in_features(self) -> int:
        return self.packed.shape[1] * 2

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]


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


def int8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """`(a @ bᵀ) * a_scale[:, None] * b_scale[None, :] + bias` with int32 accumulation.

    a: [M, K] int8; a_scale: [M] float32; b: [N, K] int8 (nn.Linear layout); b_scale: [N]
    float32; bias: [N] or None → [M, N] out_dtype.
    """
    if use_triton(a):
        from kernels.int8_gemm import int8_gemm as kernel

        return kernel(a, a_scale, b, b_scale, bias, out_dtype)
    acc = torch._int_mm(a, b.t())  # [M, N] int32
    out = acc.float() * a_scale.float()[:, None] * b_scale.float()[None, :]
    if bias is not None:
        out += bias.float()
    return out.to(out_dtype)


def w8a8_linear(
    x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x: [..., K] fp16/bf16/fp32 → [..., N] in x.dtype; x is quantized per token on the fly."""
    x2d = x.reshape(-1, x.shape[-1])
    x_q, x_scale = per_token_quant(x2d)
    out = int8_gemm(x_q, x_scale, weight.qweight, weight.scale, bias, x.dtype)
    return out.view(*x.shape[:-1], out.shape[-1])


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q: [N, K] integer values in [0, 15], K even → [N, K // 2] uint8 (even k in the low nibble)."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even K, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """packed: [N, K // 2] uint8 → [N, K] uint8 values in [0, 15]."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def quantize_weight_int4(
    weight: torch.Tensor, group_size: int = 128, scale_dtype: torch.dtype = torch.float32
) -> Int4Weight:
    """weight: [N, K] float, K even → group-wise asymmetric int4 (min/max per group).

    The scales are rounded to `scale_dtype` before quantizing, so the stored scale is the
    one the codes were computed with.
    """
    n, k = weight.shape
    if k % 2 or group_size % 32:
        raise ValueError(f"need an even K and a group size multiple of 32, got {k}, {group_size}")
    num_groups = -(-k // group_size)
    w = weight.float()
    # The last group may be short: repeat its last column, which leaves its min/max unchanged.
    pad = num_groups * group_size - k
    if pad:
        w = torch.cat((w, w[:, -1:].expand(n, pad)), dim=1)
    groups = w.view(n, num_groups, group_size)
    # The range always holds 0 (as in GPTQ), so the zero point fits in [0, 15].
    lo, hi = groups.amin(-1).clamp_max(0), groups.amax(-1).clamp_min(0)
    scale = ((hi - lo) / INT4_MAX).clamp_min(MIN_SCALE).to(scale_dtype).float()
    zero = round_half_up(-lo / scale).clamp_(0, INT4_MAX)
    q = round_half_up(groups / scale[..., None]) + zero[..., None]
    q = q.clamp_(0, INT4_MAX).view(n, -1)[:, :k]
    return Int4Weight(
        pack_int4(q).contiguous(), scale.to(scale_dtype), zero.to(torch.uint8), group_size
    )


# byte → its two codes as floats (low nibble first): one gather unpacks and converts at once,
# ~2.5x faster on CPU than bit ops + casts, which matters as the CPU path dequantizes per call.
_BYTE_CODES = torch.stack((torch.arange(256) & 0xF, torch.arange(256) >> 4), dim=-1).float()


def dequantize_int4(weight: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """→ [N, K] in `dtype`, computed in float32 as `(q - zero) * scale` and rounded once."""
    n, k = weight.out_features, weight.in_features
    num_groups, group_size = weight.scales.shape[1], weight.group_size
    lut = _BYTE_CODES.to(weight.packed.device)
    q = torch.nn.functional.embedding(weight.packed.int(), lut).view(n, k)  # [N, K] float32
    pad = num_groups * group_size - k  # the last group may be short
    if pad:
        q = torch.nn.functional.pad(q, (0, pad))
    groups = q.view(n, num_groups, group_size)
    w = (groups - weight.zeros.float()[..., None]) * weight.scales.float()[..., None]
    return w.view(n, -1)[:, :k].to(dtype)


def w4a16_gemm(
    x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x: [M, K] fp16/bf16 (fp32 on CPU) → x @ dequant(weight)ᵀ + bias, [M, N] in x.dtype."""
    if use_triton(x):
        from kernels.w4a16_gemm import w4a16_gemm as kernel

        return kernel(x, weight.packed, weight.scales, weight.zeros, weight.group_size, bias)
    w = dequantize_int4(weight, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
