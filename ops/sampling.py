"""Sampling ops: greedy argmax and inverse-CDF sampling over the vocabulary."""

from __future__ import annotations

import torch

from ops.cpu_kernels import use_cpu_kernels


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits: [R, V] float → [R] int64, the first index of each row's maximum (NaN counts
    as the maximum, as in `torch.argmax`). The CPU kernel is 3x faster than torch's for
    SmolLM2's 49k vocabulary (0.57 vs 1.9 ms for 32 rows on 2 cores)."""
    if use_cpu_kernels(logits) and logits.dim() == 2 and logits.stride(-1) == 1:
        return torch.ops.headrace_cpu.argmax_rows(logits)
    return logits.argmax(dim=-1)


def sample_rows(x: torch.Tensor, temps: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Sample each row of softmax(x / temps) by inverting its CDF at u.

    x: [R, V] float32 logits (-inf: masked), temps: [R] > 0, u: [R] in [0, 1) → [R] int64,
    the first index whose cumulative probability exceeds u * total. The CPU kernel sums the
    probabilities a vector at a time (torch's cumsum is one scalar add at a time: 2.7 ms of
    a 32-row step for a 49k vocabulary); it may differ from the reference only where u sits
    within float rounding of a CDF step.
    """
    if use_cpu_kernels(x) and x.dim() == 2 and x.stride(-1) == 1:
        return torch.ops.headrace_cpu.sample_rows(x, temps.reciprocal(), u)
    return sample_rows_reference(x, temps, u)


def sample_rows_reference(x: torch.Tensor, temps: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """sample_rows in torch ops: softmax, cumsum, searchsorted."""
    cdf = torch.softmax(x / temps.unsqueeze(1), dim=-1).cumsum_(dim=-1)
    return invert_cdf(cdf, u, cdf[:, -1])


def invert_cdf(cdf: torch.Tensor, u: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """cdf: [R, N] nondecreasing float32, u: [R] in [0, 1), total: [R] mass kept → [R] index.

    Index of the first cdf entry above u * total. Zero-mass entries are flat in the
    cdf and never chosen. The min with the first entry reaching `total` keeps a
    uniform of exactly 1.0 inside the kept set instead of running past it.
    """
    total = total.unsqueeze(1).contiguous()
    pos = torch.searchsorted(cdf, u.unsqueeze(1) * total, right=True)
    last = torch.searchsorted(cdf, total)
    return torch.minimum(pos, last).squeeze(1)
