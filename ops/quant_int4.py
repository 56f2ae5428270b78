"""Quantized linear-layer ops, W4A16: group-wise asymmetric int4 weights, fp16/bf16 activations.

Weights are int4 in groups of `group_size` along K (the last group may be shorter), packed
two per byte (even k in the low nibble), dequantized as `(q - zero) * scale`. The zero
point is an integer in [0, 15] (uint8, GPTQ/AWQ style: the grid holds 0 exactly) or a real
number (float32, GGUF Q4_1 style: the grid spans exactly the group's [min, max]).

Rounding is half-up as in `ops.quant`. The CPU path dequantizes per call (it saves memory,
not time); CUDA tensors go to `kernels.w4a16_gemm`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ops.dispatch import use_triton
from ops.quant import MIN_SCALE, round_half_up

INT4_MAX = 15


@dataclass(frozen=True)
class Int4Weight:
    """W4A16 weight.

    packed: [N, K // 2] uint8, k = 2i in the low nibble of byte i, k = 2i + 1 in the high one.
    scales: [N, ceil(K / group_size)] float (float32, float16 or bfloat16).
    zeros: [N, ceil(K / group_size)] uint8 in [0, 15], or float32 (any real).
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


def _int4_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """weight: [N, K] float, K even → ([N, G, group_size] float32, pad): K split into groups.

    The last group may be short: its last column is repeated `pad` times, which leaves its
    min/max unchanged.
    """
    n, k = weight.shape
    if k % 2 or group_size % 32:
        raise ValueError(f"need an even K and a group size multiple of 32, got {k}, {group_size}")
    num_groups = -(-k // group_size)
    w = weight.float()
    pad = num_groups * group_size - k
    if pad:
        w = torch.cat((w, w[:, -1:].expand(n, pad)), dim=1)
    return w.view(n, num_groups, group_size), pad


def int4_params(
    lo: torch.Tensor, hi: torch.Tensor, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 grid of the range [lo, hi] (any shape, widened to hold 0, as in GPTQ,
    so the zero point fits in [0, 15]) → (scale float32, already rounded to `scale_dtype`;
    zero float32 integer-valued in [0, 15]), same shape."""
    lo, hi = lo.clamp_max(0), hi.clamp_min(0)
    scale = ((hi - lo) / INT4_MAX).clamp_min(MIN_SCALE).to(scale_dtype).float()
    zero = round_half_up(-lo / scale).clamp_(0, INT4_MAX)
    return scale, zero


def int4_float_params(
    lo: torch.Tensor, hi: torch.Tensor, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 grid spanning exactly [lo, hi], with a real zero point → (scale
    float32, rounded to `scale_dtype`; zero float32 = -lo / scale), same shape as lo."""
    scale = ((hi - lo) / INT4_MAX).clamp_min(MIN_SCALE).to(scale_dtype).float()
    return scale, -lo / scale


def int4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """w: [..., g] float32; scale, zero: [...] → codes [..., g] float32 in [0, 15].

    `round(w / scale + zero)`: for an integer zero the same as `round(w / scale) + zero`.
    """
    return round_half_up(w / scale[..., None] + zero[..., None]).clamp_(0, INT4_MAX)


def quantize_weight_int4(
    weight: torch.Tensor,
    group_size: int = 128,
    scale_dtype: torch.dtype = torch.float32,
    float_zeros: bool = False,
) -> Int4Weight:
    """weight: [N, K] float, K even → group-wise asymmetric int4 (min/max per group), with
    integer zero points (uint8) or, `float_zeros`, real ones (float32).

    The scales are rounded to `scale_dtype` before quantizing, so the stored scale is the
    one the codes were computed with. A weight already on a 16-level grid per group (a
    dequantized GGUF Q4_1 at its block size) comes back exactly with `float_zeros`.
    """
    groups, _ = _int4_groups(weight, group_size)  # [N, G, group_size]
    params = int4_float_params if float_zeros else int4_params
    scale, zero = params(groups.amin(-1), groups.amax(-1), scale_dtype)
    return _pack_int4_weight(
        int4_codes(groups, scale, zero), scale, zero, weight.shape[1], scale_dtype, float_zeros
    )


def int4_clip_search(
    groups: torch.Tensor,
    scale_dtype: torch.dtype = torch.float32,
    grid: int = 20,
    min_shrink: float = 0.5,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MSE-optimal clipping: per group, the int4 grid of `[p * min, p * max]` over `grid`
    shrink factors p from 1 down to `min_shrink` with the least squared reconstruction error.

    groups: [..., g] float32; mask: [g] bool, the columns that count (None: all)
    → (scale, zero) as `int4_params`, shape [...]. p = 1 (plain min/max) is tried first and
    only a strictly lower error replaces it, so no group gets worse.
    """
    lo, hi = groups.amin(-1), groups.amax(-1)
    best_scale, best_zero = int4_params(lo, hi, scale_dtype)
    best_err = torch.full_like(lo, float("inf"))
    for p in torch.linspace(1.0, min_shrink, grid).tolist():
        scale, zero = int4_params(lo * p, hi * p, scale_dtype)
        s, z = scale[..., None], zero[..., None]
        # In place, = (int4_codes(groups, scale, zero) - zero) * scale - groups (zero is an
        # integer, so it can go inside the floor); up to float rounding of w / s at ties.
        sq = groups.div(s).add_(z + 0.5).floor_().clamp_(0, INT4_MAX).sub_(z).mul_(s)
        sq = sq.sub_(groups).square_()
        err = (sq if mask is None else sq.mul_(mask)).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize_weight_int4_clipped(
    weight: torch.Tensor,
    group_size: int = 128,
    scale_dtype: torch.dtype = torch.float32,
    grid: int = 20,
) -> Int4Weight:
    """As `quantize_weight_int4` (same format), with each group's range from `int4_clip_search`:
    values beyond the shrunk range clip, the rest get a finer grid. weight: [N, K]."""
    groups, pad = _int4_groups(weight, group_size)  # [N, G, group_size]
    mask = None
    if pad:  # the repeated last column must not weigh in the last group's error
        mask = torch.ones(groups.shape[1:], dtype=torch.bool, device=groups.device)
        mask[-1, group_size - pad :] = False
    scale, zero = int4_clip_search(groups, scale_dtype, grid, mask=mask)
    return _pack_int4_weight(
        int4_codes(groups, scale, zero), scale, zero, weight.shape[1], scale_dtype
    )


def _pack_int4_weight(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    k: int,
    scale_dtype: torch.dtype,
    float_zeros: bool = False,
) -> Int4Weight:
    """codes: [N, G, group_size] float in [0, 15]; scale, zero: [N, G] → Int4Weight (K = k).

    zero: integer-valued (stored uint8) unless `float_zeros` (stored float32).
    """
    n, _, group_size = codes.shape
    q = codes.reshape(n, -1)[:, :k]
    return Int4Weight(
        pack_int4(q).contiguous(), scale.to(scale_dtype), store_zeros(zero, float_zeros), group_size
    )


def store_zeros(zero: torch.Tensor, float_zeros: bool) -> torch.Tensor:
    """Zero points [N, G] as stored: float32 (real) or uint8 (integer-valued)."""
    return zero.float().contiguous() if float_zeros else zero.to(torch.uint8).contiguous()


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
