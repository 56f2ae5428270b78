"""GPTQ: quantize a weight column by column, compensating each column's rounding error in
the columns not yet quantized, weighted by the input Hessian `H = Σ xᵀx` of calibration
activations (Frantar et al., 2023).

Round-to-nearest minimizes `‖W - Q‖` per weight; GPTQ minimizes the layer's output error
`‖(W - Q) Xᵀ‖` over the calibration inputs, which is what the next layer sees. The outputs
use the round-to-nearest storage formats (`ops.quant_int4.Int4Weight`,
`ops.quant.Int8Weight`), so the kernels run them unchanged. Pure tensor math: the Hessians come from calibration
(`worker.models.calibration.input_xtx`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ops.quant import INT8_MAX, MIN_SCALE, Int8Weight, round_half_up
from ops.quant_int4 import (
    INT4_MAX,
    Int4Weight,
    int4_clip_search,
    int4_float_params,
    pack_int4,
    store_zeros,
)

DEFAULT_GROUP_SIZE = 128
# Added to H's diagonal, relative to its mean: keeps H invertible when some input channels
# are (nearly) constant over the calibration text; GPTQ's default.
DEFAULT_DAMP = 0.01

# A block's columns [N, b] (already compensated) → (scale [N], zero [N], lowest code,
# highest code): the grid its columns round to, `code = clamp(round(w / scale + zero))`.
Grid = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, int, int]]


def _inverse_hessian_factor(
    weight: torch.Tensor, hessian: torch.Tensor, damp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """→ (W [N, K] float32 copy, with never-active inputs' columns zeroed; upper Cholesky
    factor of the damped H⁻¹ [K, K] float32: row i says how column i's error moves columns > i)."""
    k = weight.shape[1]
    if hessian.shape != (k, k):
        raise ValueError(
            f"Hessian {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}"
        )
    w = weight.detach().float().clone()
    h = hessian.detach().to(w.device, torch.float64).clone()
    dead = h.diagonal() == 0  # inputs never active: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    return w, hinv.float()


def _gptq(
    weight: torch.Tensor, hessian: torch.Tensor, block: int, grid: Grid, damp: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GPTQ loop, one block of `block` columns at a time (the lazy batch): the block's
    grid first, then each column rounded and its error spread over the block's later
    columns, then the block's errors over all later blocks at once.

    weight: [N, K]; hessian: [K, K] → (codes [N, K] float32, scales [N, G], zeros [N, G]).
    """
    w, hinv = _inverse_hessian_factor(weight, hessian, damp)
    n, k = w.shape
    num_blocks = -(-k // block)
    codes = torch.empty(n, k, dtype=torch.float32, device=w.device)
    scales = torch.empty(n, num_blocks, dtype=torch.float32, device=w.device)
    zeros = torch.empty_like(scales)
    for g in range(num_blocks):
        i1, i2 = g * block, min((g + 1) * block, k)
        w1 = w[:, i1:i2].clone()  # [N, b], with every earlier block's compensation
        scale, zero, lo, hi = grid(w1)
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            q = round_half_up(col / scale + zero).clamp_(lo, hi)
            codes[:, i1 + i] = q
            err = (col - (q - zero) * scale) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        scales[:, g], zeros[:, g] = scale, zero
    return codes, scales, zeros


def gptq_quantize_int4(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int = DEFAULT_GROUP_SIZE,
    scale_dtype: torch.dtype = torch.float32,
    damp: float = DEFAULT_DAMP,
    clip_grid: int = 20,
    float_zeros: bool = False,
) -> Int4Weight:
    """weight: [N, K] float, K even; hessian: [K, K] (`Σ xᵀx` of the inputs) → Int4Weight.

    One GPTQ block per quantization group; each group's grid is picked from the weights as
    updated by the earlier groups' error compensation: integer zero points with an MSE
    clipping search over `clip_grid` shrink factors (1: plain min/max), or, `float_zeros`,
    real zero points spanning the group's min/max.
    """
    if weight.shape[1] % 2 or group_size % 32:
        raise ValueError(
            f"need an even K and a group size multiple of 32, got {weight.shape[1]}, {group_size}"
        )

    def grid(w1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        if float_zeros:
            scale, zero = int4_float_params(w1.amin(-1), w1.amax(-1), scale_dtype)
            return scale, zero, 0, INT4_MAX
        scale, zero = int4_clip_search(w1[:, None, :], scale_dtype, clip_grid)
        return scale[:, 0], zero[:, 0], 0, INT4_MAX

    codes, scales, zeros = _gptq(weight, hessian, group_size, grid, damp)
    return Int4Weight(
        pack_int4(codes).contiguous(),
        scales.to(scale_dtype),
        store_zeros(zeros, float_zeros),
        group_size,
    )


def gptq_quantize_int8(
    weight: torch.Tensor, hessian: torch.Tensor, damp: float = DEFAULT_DAMP, block: int = 128
) -> Int8Weight:
    """weight: [N, K] float; hessian: [K, K] → per-output-channel symmetric Int8Weight.

    The channel scales are the round-to-nearest ones (row abs-max / 127), fixed up front:
    compensation may push a later weight past the row's max, and it clips there.
    """
    row_scale = (weight.detach().float().abs().amax(dim=1) / INT8_MAX).clamp_min(MIN_SCALE)
    zero = torch.zeros_like(row_scale)

    def grid(_w1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        return row_scale, zero, -INT8_MAX, INT8_MAX

    codes, _, _ = _gptq(weight, hessian, block, grid, damp)
    return Int8Weight(codes.to(torch.int8).contiguous(), row_scale.contiguous())
