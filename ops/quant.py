"""Quantized linear-layer ops: int8 (W8A8) and int4 (W4A16) weights, per-token int8 activations.

Schemes:
- W8A8: weights symmetric int8 with one scale per output channel; activations symmetric
  int8 with one scale per token, computed on the fly; int32 accumulation; the scales
  (and bias) are applied in the epilogue: `out = (a_q @ b_qᵀ) * a_scale[:, None] * b_scale`.
- W4A16: weights asymmetric int4 in groups of `group_size` along K (the last group may be
  shorter), packed two per byte (even k in the low nibble), dequantized as
  `(q - zero) * scale`; activations stay fp16/bf16. The zero point is an integer in
  [0, 15] (uint8, GPTQ/AWQ style: the grid holds 0 exactly) or a real number (float32,
  GGUF Q4_1 style: the grid spans exactly the group's [min, max]).

Rounding is half-up (`floor(x + 0.5)`) everywhere, on CPU and in the Triton kernels, so the two
agree bit for bit away from float rounding ties. CPU paths use torch (`torch._int_mm` for the
int8 GEMM); CUDA tensors go to the kernels in `kernels/`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ops.dispatch import use_triton
from ops.rotation import hadamard, rotate

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
) -> torch.Tensor:
    """x: [..., K] fp16/bf16/fp32 → [..., N] in x.dtype; x is quantized per token on the fly
    (after the division by `smooth` and the block rotation the weight was quantized with)."""
    x2d = x.reshape(-1, x.shape[-1])
    x_q, x_scale = quantize_activations(x2d, smooth, rotation)
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
