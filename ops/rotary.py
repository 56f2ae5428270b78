"""Rotary position embedding in the rotate-half convention of HF Llama (`worker.models.rope`)."""

from __future__ import annotations

import torch

from ops.cpu_kernels import use_cpu_kernels
from ops.dispatch import use_triton


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by their tokens' angles; returns new tensors.

    q: [T, H, D]; k: [T, KVH, D] (views with a unit last stride are fine);
    cos, sin: [T, D] or [T, 1, D], the gathered rows of `RotaryEmbedding`'s tables.
    The CPU path computes in q.dtype (as HF Llama does); the Triton kernel
    computes in float32 and rounds once.
    """
    cos = cos.reshape(cos.shape[0], -1)
    sin = sin.reshape(sin.shape[0], -1)
    if use_triton(q):
        from kernels.rotary import apply_rotary as kernel

        return kernel(q, k, cos, sin)
    cos, sin = cos.to(q.dtype).unsqueeze(1), sin.to(q.dtype).unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def apply_rotary_at(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_rotary` at `positions` ([T] int64) of the [max_positions, D] tables.

    The CPU kernel rotates q and k in place and returns them (it reads the table rows
    itself, so no [T, D] gathers are made); elsewhere the rows are gathered and
    `apply_rotary` returns new tensors. Callers use the returned tensors either way.
    """
    if use_cpu_kernels(q):
        torch.ops.headrace_cpu.rotary_embedding(q, k, positions, cos_table, sin_table)
        return q, k
    return apply_rotary(q, k, cos_table[positions], sin_table[positions])
