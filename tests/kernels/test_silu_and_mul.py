"""Triton silu_and_mul against the torch op (float32 math in the kernel, x.dtype in torch)."""

from __future__ import annotations

import pytest
import torch

from ops import activation

kernels = pytest.importorskip("kernels.activation", reason="triton is not installed")


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)]
)
@pytest.mark.parametrize("shape", [(7, 2 * 100), (2, 3, 2 * 1536)])
def test_matches_torch(device, dtype, tol, shape) -> None:
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(9)) * 4).to(dtype).to(device)
    expected = activation.silu_and_mul(x.cpu().float())  # float32: the kernel's own math
    actual = kernels.silu_and_mul(x, block=64)
    assert actual.shape == (*shape[:-1], shape[-1] // 2) and actual.dtype == dtype
    torch.testing.assert_close(actual.cpu().float(), expected, atol=tol, rtol=tol)
    # And the CPU path in x.dtype differs from it by rounding only.
    torch.testing.assert_close(
        activation.silu_and_mul(x.cpu()).float(), expected, atol=4 * tol, rtol=4 * tol
    )
