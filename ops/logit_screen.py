"""Greedy argmax of the lm_head's logits through an int8 screen (CPU kernel, torch reference).

An int8 copy of the lm_head (per-row scales, block Hadamard rotated like W8A8's projections)
gives approximate logits at the int8 GEMM's speed; a bound on their error rules out all but
a few tokens, which are scored exactly (kernels/cpu/logit_screen.cpp explains the bound).
The result is the argmax of the exact float32 logits, as `screened_argmax_reference`
computes it with one float32 matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ops.cpu_kernels import use_cpu_kernels
from ops.quant import packed_int8_weight, quantize_activations, quantize_symmetric
from ops.rotation import hadamard, rotate, rotation_block


@dataclass(frozen=True)
class LogitScreen:
    """The int8 copy of an lm_head weight W [V, K] (model dtype), and what its bound needs.

    rotation: the Hadamard block R (1: none); packed: our int8 GEMM's packed copy of the
    codes of W R; scale: [V] float32 per row; weight: W itself (the exact scores read it);
    norms: [V] float32 |W_j|; error_norms: [V] float32 |W_j R - scale_j * codes_j|.
    """

    rotation: int
    packed: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    norms: torch.Tensor
    error_norms: torch.Tensor


def build_logit_screen(weight: torch.Tensor) -> LogitScreen | None:
    """weight: [V, K] lm_head (float dtype) → its screen, or None where the screen cannot run
    (not on CPU, no CPU kernels, or no int8 GEMM of ours on this CPU)."""
    if not use_cpu_kernels(weight) or not weight.is_floating_point():
        return None
    w = weight.detach()
    rotation = rotation_block(w.shape[1])
    # W R in float64, so that its quantization error below is that of the exact rotation (the
    # bound's slack covers float32 rounding of the per-step side only); the codes and the
    # float32 scales the GEMM applies may come from any rounding: the error is measured.
    h = hadamard(rotation).double()
    wr = (w.double().reshape(w.shape[0], -1, rotation) @ h).reshape(w.shape)
    codes, scale = quantize_symmetric(wr)
    packed = packed_int8_weight(codes)
    if packed is None:
        return None
    err = wr - codes.double() * scale.double()[:, None]
    return LogitScreen(
        rotation=rotation,
        packed=packed,
        scale=scale.contiguous(),
        weight=w.contiguous(),
        norms=w.double().norm(dim=1).float().contiguous(),
        error_norms=err.norm(dim=1).float().contiguous(),
    )


def screened_argmax(hidden: torch.Tensor, screen: LogitScreen, vocab: int) -> torch.Tensor:
    """hidden: [T, K] in the weight's dtype → [T] int64, the first index of each row's largest
    exact logit among the first `vocab` (`screened_argmax_reference`)."""
    x = hidden.contiguous()
    x_rot = rotate(x, screen.rotation).contiguous()
    codes, x_scale = quantize_activations(x_rot)
    approx = torch.ops.headrace_cpu.packed_linear_int8(
        codes, x_scale, screen.packed, screen.scale, screen.weight.shape[0], None, torch.float32
    )
    return torch.ops.headrace_cpu.screened_argmax(
        approx, x, x_rot, codes, x_scale, screen.weight, screen.norms, screen.error_norms, vocab
    )


def screened_argmax_reference(
    hidden: torch.Tensor, weight: torch.Tensor, vocab: int
) -> torch.Tensor:
    """The argmax of the float32 logits hidden @ weight[:vocab]ᵀ: [T, K], [V, K] → [T] int64."""
    return (hidden.float() @ weight[:vocab].float().t()).argmax(dim=-1)
