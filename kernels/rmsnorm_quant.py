"""Triton per-token int8 quantization of activations, fused with what comes before it: the
RMSNorm, or W8A8's SmoothQuant division and block Hadamard rotation.

One program per token row: the row is read once, transformed in float32, and written as int8
codes plus one float32 scale (symmetric, `amax / 127`, rounded half-up). The rotation views
the row as [BLOCK_K / B, B] and multiplies it by the B x B Hadamard matrix with one `tl.dot`
(3xTF32: float32 accuracy on tensor cores), so W8A8 as served costs one launch before its
GEMM instead of five eager ops.

Reference: `ops.quant.rmsnorm_quant`, `ops.quant.quantize_activations` and
`ops.quant.quantize_symmetric`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INT8_MAX = tl.constexpr(127.0)
MIN_SCALE = 2.0**-20  # same floor as ops.quant.MIN_SCALE


@triton.jit
def _quant_row_kernel(
    x_ptr,
    weight_ptr,
    smooth_ptr,
    rotation_ptr,
    out_ptr,
    scale_ptr,
    stride_xm,
    stride_om,
    K,
    eps,
    min_scale,
    HAS_NORM: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    ROT_BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    x = tl.load(x_ptr + row * stride_xm + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / K + eps)
        weight = tl.load(weight_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        x = x * rstd * weight
    if HAS_SMOOTH:
        x = tl.math.div_rn(x, tl.load(smooth_ptr + offs_k, mask=k_mask, other=1.0))
    if ROT_BLOCK > 1:
        # K is a multiple of ROT_BLOCK, so the padding past K is whole blocks of zeros.
        offs_r = tl.arange(0, ROT_BLOCK)
        rotation = tl.load(rotation_ptr + offs_r[:, None] * ROT_BLOCK + offs_r[None, :])
        blocks = tl.reshape(x, (BLOCK_K // ROT_BLOCK, ROT_BLOCK))
        x = tl.reshape(tl.dot(blocks, rotation, input_precision="tf32x3"), (BLOCK_K,))
    # div_rn: IEEE division as in torch. The default `/` is approximate on GPUs, and with
    # bf16/fp16 inputs `x / scale` often lands exactly on .5, where an ulp flips the code.
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=0), INT8_MAX), min_scale)
    codes = tl.floor(tl.math.div_rn(x, scale) + 0.5)
    codes = tl.minimum(tl.maximum(codes, -INT8_MAX), INT8_MAX)
    tl.store(out_ptr + row * stride_om + offs_k, codes.to(tl.int8), mask=k_mask)
    tl.store(scale_ptr + row, scale)


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    smooth: torch.Tensor | None = None,
    rotation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [M, K] with a unit stride on K, got {tuple(x.shape)}")
    m, k = x.shape
    for name, vector in (("weight", weight), ("smooth", smooth)):
        if vector is not None and (vector.shape != (k,) or not vector.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous [{k}]")
    block_k = triton.next_power_of_2(k)
    rot_block = 1
    if rotation is not None:
        rot_block = rotation.shape[0]
        if rotation.shape != (rot_block, rot_block) or rotation.dtype != torch.float32:
            raise ValueError(f"rotation must be a float32 [B, B], got {tuple(rotation.shape)}")
        if rot_block < 16 or rot_block & (rot_block - 1) or k % rot_block:
            raise ValueError(f"rotation block {rot_block}: a power of two >= 16 dividing K = {k}")
        rotation = rotation.contiguous()
        block_k = max(block_k, 16 * rot_block)  # tl.dot needs >= 16 rows of blocks
    out = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return out, scale
    _quant_row_kernel[(m,)](
        x, weight, smooth, rotation, out, scale, x.stride(0), out.stride(0), k, eps, MIN_SCALE,
        HAS_NORM=weight is not None, HAS_SMOOTH=smooth is not None, ROT_BLOCK=rot_block,
        BLOCK_K=block_k, num_warps=min(16, max(1, block_k // 256)),
    )  # fmt: skip
    return out, scale


def rmsnorm_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm(x) * weight, quantized per token.

    x: [M, K] fp16/bf16/fp32 (unit stride on K); weight: [K] → (int8 [M, K], float32 scale [M]).
    """
    return _launch(x, weight, eps)


def per_token_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] → (int8 [M, K], float32 scale [M]), symmetric per row."""
    return _launch(x, None, 0.0)


def smooth_rotate_quant(
    x: torch.Tensor, smooth: torch.Tensor | None, rotation: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 of `blockdiag(rotation)`-rotated `x / smooth` (W8A8's input as served).

    x: [M, K] fp16/bf16/fp32; smooth: [K] float32 or None; rotation: [B, B] float32 (B a power
    of two >= 16 dividing K) or None → (int8 [M, K], float32 scale [M]).
    """
    return _launch(x, None, 0.0, smooth, rotation)
