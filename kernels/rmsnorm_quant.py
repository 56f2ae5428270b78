"""Triton per-token int8 quantization of activations, optionally fused with the RMSNorm before it.

One program per token row: the row is read once, normalized in float32, and written as int8
codes plus one float32 scale (symmetric, `amax / 127`, rounded half-up).

Reference: `ops.quant.rmsnorm_quant` and `ops.quant.quantize_symmetric`.
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
    out_ptr,
    scale_ptr,
    stride_xm,
    stride_om,
    K,
    eps,
    min_scale,
    HAS_NORM: tl.constexpr,
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
    # div_rn: IEEE division as in torch. The default `/` is approximate on GPUs, and with
    # bf16/fp16 inputs `x / scale` often lands exactly on .5, where an ulp flips the code.
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=0), INT8_MAX), min_scale)
    codes = tl.floor(tl.math.div_rn(x, scale) + 0.5)
    codes = tl.minimum(tl.maximum(codes, -INT8_MAX), INT8_MAX)
    tl.store(out_ptr + row * stride_om + offs_k, codes.to(tl.int8), mask=k_mask)
    tl.store(scale_ptr + row, scale)


def _launch(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [M, K] with a unit stride on K, got {tuple(x.shape)}")
    m, k = x.shape
    if weight is not None and (weight.shape != (k,) or not weight.is_contiguous()):
        raise ValueError(f"weight must be a contiguous [{k}]")
    out = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return out, scale
    block_k = triton.next_power_of_2(k)
    _quant_row_kernel[(m,)](
        x, weight, out, scale, x.stride(0), out.stride(0), k, eps, MIN_SCALE,
        HAS_NORM=weight is not None, BLOCK_K=block_k,
        num_warps=min(16, max(1, block_k // 256)),
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
