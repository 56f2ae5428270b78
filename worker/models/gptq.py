"""GPTQ for W4A16: quantize a weight column by column, compensating each column's rounding
error in the columns not yet quantized, weighted by the input Hessian `H = Σ xᵀx` of
calibration activations (Frantar et al., 2023).

Round-to-nearest minimizes `‖W - Q‖` per weight; GPTQ minimizes the layer's output error
`‖(W - Q) Xᵀ‖` over the calibration inputs, which is what the next layer sees. The output
uses the same storage as round-to-nearest (`ops.quant.Int4Weight`: groups along K, integer
zero points in [0, 15]), so the W4A16 kernels run it unchanged. Each group's grid is picked
(with the MSE clipping search) when the quantization reaches the group, from the weights as
updated by the earlier groups' error compensation.
"""

from __future__ import annotations

import torch
from torch import nn

from ops.quant import Int4Weight, int4_clip_search, int4_codes, pack_int4
from worker.models.calibration import DEFAULT_WINDOW, collect_input_stats
from worker.models.llama import LlamaForCausalLM
from worker.models.quantized import (
    DEFAULT_GROUP_SIZE,
    W4A16Linear,
    _bias,
    _replace,
    quantizable_linears,
)

# Added to H's diagonal, relative to its mean: keeps H invertible when some input channels
# are (nearly) constant over the calibration text; GPTQ's default.
DEFAULT_DAMP = 0.01


def calibrate_hessians(
    model: LlamaForCausalLM, token_ids: list[int], window: int = DEFAULT_WINDOW
) -> dict[str, torch.Tensor]:
    """Input Hessians of every projection of the (float) `model` over a text, by
    `quantizable_linears` name: xᵀx summed over tokens, [K, K] float32 each (GPTQ is
    invariant to its scale); the text runs in windows of `window` tokens."""

    def add_xtx(seen: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        xtx = x.t() @ x  # [K, K]
        return xtx if seen is None else seen.add_(xtx)

    return collect_input_stats(model, token_ids, add_xtx, window)


def gptq_quantize_int4(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int = DEFAULT_GROUP_SIZE,
    scale_dtype: torch.dtype = torch.float32,
    damp: float = DEFAULT_DAMP,
    clip_grid: int = 20,
) -> Int4Weight:
    """weight: [N, K] float, K even; hessian: [K, K] (`Σ xᵀx` of the inputs) → Int4Weight.

    Processes one group of `group_size` columns at a time (GPTQ's lazy batch = one group):
    the group's grid first (clipping search over `clip_grid` shrink factors; 1: plain
    min/max), then each column rounded and its error spread over the group's later columns,
    then the group's errors over all later groups at once.
    """
    n, k = weight.shape
    assert hessian.shape == (k, k), (weight.shape, hessian.shape)
    if k % 2 or group_size % 32:
        raise ValueError(f"need an even K and a group size multiple of 32, got {k}, {group_size}")
    w = weight.detach().float().clone()  # [N, K], updated in place as columns are quantized
    h = hessian.detach().to(w.device, torch.float64).clone()
    dead = h.diagonal() == 0  # inputs never active: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    # Upper Cholesky factor of H⁻¹: row i holds how column i's error moves columns > i.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    hinv = hinv.float()

    num_groups = -(-k // group_size)
    codes = torch.empty(n, k, dtype=torch.float32, device=w.device)
    scales = torch.empty(n, num_groups, dtype=torch.float32, device=w.device)
    zeros = torch.empty_like(scales)
    for g in range(num_groups):
        i1, i2 = g * group_size, min((g + 1) * group_size, k)
        w1 = w[:, i1:i2].clone()  # [N, b]: this group, with every earlier group's compensation
        scale, zero = int4_clip_search(w1[:, None, :], scale_dtype, clip_grid)
        scale, zero = scale[:, 0], zero[:, 0]  # [N]
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            q = int4_codes(col[:, None], scale, zero)[:, 0]  # [N]
            codes[:, i1 + i] = q
            err = (col - (q - zero) * scale) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        scales[:, g], zeros[:, g] = scale, zero
    return Int4Weight(
        pack_int4(codes).contiguous(),
        scales.to(scale_dtype),
        zeros.to(torch.uint8),
        group_size,
    )


def gptq_quantize_model(
    model: LlamaForCausalLM,
    hessians: dict[str, torch.Tensor],
    group_size: int = DEFAULT_GROUP_SIZE,
    damp: float = DEFAULT_DAMP,
) -> None:
    """Replace every layer's projections by GPTQ-quantized W4A16Linear modules, in place.

    hessians: by `quantizable_linears` name, [K, K] each (from `calibrate_hessians`).
    """
    for name, linear in list(quantizable_linears(model)):
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is already quantized")
        if name not in hessians:
            raise ValueError(f"no calibration statistics for {name}")
        weight = gptq_quantize_int4(linear.weight, hessians[name], group_size, damp=damp)
        _replace(model, name, W4A16Linear(weight, _bias(linear), None))
