"""RMSNorm, plain and fused with the residual add that precedes it in a decoder layer.

The torch implementations round as HF's LlamaRMSNorm does (normalize in float32, round to
the input dtype, then scale by the weight in that dtype); the CPU kernels compute the same
in float32 with the same two roundings (`kernels/cpu/elementwise.cpp`).
"""

from __future__ import annotations

import torch

from ops.cpu_kernels import use_cpu_kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., H] → [..., H] in x.dtype; weight: [H] in x.dtype."""
    if use_cpu_kernels(x) and x.stride(-1) == 1 and weight.dtype == x.dtype:
        rows = x.reshape(-1, x.shape[-1])
        return torch.ops.headrace_cpu.rms_norm(rows, weight, eps).view(x.shape)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), the sum rounded to x.dtype.

    x, residual: [T, H]. Both inputs may be overwritten (the CPU kernel works in place), so
    callers pass tensors they own and use only the returned ones.
    """
    if use_cpu_kernels(x) and x.dim() == 2 and weight.dtype == x.dtype:
        torch.ops.headrace_cpu.fused_add_rms_norm(x, residual, weight, eps)
        return x, residual
    residual = x + residual
    return rms_norm(residual, weight, eps), residual
