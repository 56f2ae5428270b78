"""Gated activation of the Llama MLP: silu(gate) * up over the fused gate_up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ops.dispatch import use_triton


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2 * I] (gate then up) → [..., I] in x.dtype.

    The CPU path computes in x.dtype like the model's MLP; the Triton kernel computes in
    float32 and rounds once, so the two differ by rounding only.
    """
    if use_triton(x):
        from kernels.activation import silu_and_mul as kernel

        return kernel(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
