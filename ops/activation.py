"""Gated activation of the Llama MLP: silu(gate) * up over the fused gate_up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ops.cpu_kernels import use_cpu_kernels
from ops.dispatch import use_triton


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2 * I] (gate then up) → [..., I] in x.dtype.

    The torch path computes in x.dtype like the model's MLP; the Triton and CPU kernels
    compute in float32 and round once, so they differ from it by rounding only.
    """
    if use_triton(x):
        from kernels.activation import silu_and_mul as kernel

        return kernel(x)
    if use_cpu_kernels(x) and x.dim() == 2 and x.stride(-1) == 1:
        return torch.ops.headrace_cpu.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
