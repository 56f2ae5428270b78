"""Sampling ops: greedy argmax over the vocabulary."""

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
