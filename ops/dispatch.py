"""Dispatch rule shared by the quantization and fused ops: Triton on CUDA, torch elsewhere."""

from __future__ import annotations

import functools
import importlib.util

import torch


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported (it is absent on macOS/Windows and some CPU installs)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(tensor: torch.Tensor) -> bool:
    """Run the Triton kernel for `tensor`'s op: only on CUDA, and only when triton is installed."""
    return tensor.is_cuda and triton_available()
