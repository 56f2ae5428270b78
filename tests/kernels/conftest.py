"""Kernel tests run the Triton kernels on CPU tensors under the Triton interpreter by default.

`TRITON_INTERPRET` is read when `@triton.jit` decorates a kernel, so it is set here, before any
test module imports `kernels`, and only where there is no GPU: on a GPU machine the kernels
are compiled and run on CUDA (the same tests, with the bf16 cases that the interpreter cannot
run); `TRITON_INTERPRET=1` forces the interpreter there too.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if any(name.startswith("kernels.") for name in sys.modules):
    # A kernels module imported before this conftest was decorated in the other mode.
    raise RuntimeError(
        "tests/kernels: a kernels module was imported before TRITON_INTERPRET was set"
    )

# The interpreter keeps bfloat16 as raw uint16 and `tl.dot` multiplies the bit patterns
# (triton-lang/triton#11584: bf16 is unsupported by the interpreter). Kernels that feed bf16
# into tl.dot are therefore checked in bf16 only when compiled for a GPU.
BF16_DOT = pytest.param(
    torch.bfloat16,
    marks=pytest.mark.skipif(INTERPRET, reason="interpreter has no bf16 tl.dot (triton#11584)"),
    id="bf16",
)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CPU tensors under the interpreter; CUDA when the kernels are compiled."""
    if INTERPRET:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 needs a CUDA device")
    return torch.device("cuda")
