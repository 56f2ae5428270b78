"""Triton RMSNorm + per-token int8 quantization (and plain per-token quant) against torch."""

from __future__ import annotations

import pytest
import torch

from ops import quant

kernels = pytest.importorskip("kernels.rmsnorm_quant", reason="triton is not installed")


def _assert_quantized_close(actual, expected) -> None:
    """Codes within one step (rounding ties may flip), scales to float32 rounding."""
    (codes, scale), (want_codes, want_scale) = actual, expected
    torch.testing.assert_close(scale, want_scale, atol=0, rtol=1e-5)
    diff = (codes.int() - want_codes.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def _rows(m: int, k: int, dtype, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-2, 1, m)[:, None]
    x[1] = 0  # an all-zero row: the scale floor, not a division by zero
    return x.to(dtype).to(device)


# K: SmolLM2's 576 (not a power of two) and a small odd size.
@pytest.mark.parametrize("k", [576, 99])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rmsnorm_quant_matches_torch(device, k: int, dtype) -> None:
    x = _rows(7, k, dtype, device)
    weight = (torch.rand(k, generator=torch.Generator().manual_seed(7)) + 0.5).to(dtype).to(device)
    expected = quant.rmsnorm_quant(x.cpu(), weight.cpu(), 1e-5)
    actual = kernels.rmsnorm_quant(x, weight, 1e-5)
    _assert_quantized_close([t.cpu() for t in actual], expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_per_token_quant_matches_torch(device, dtype) -> None:
    x = _rows(5, 1536, dtype, device)
    expected = quant.quantize_symmetric(x.cpu())
    actual = kernels.per_token_quant(x)
    _assert_quantized_close([t.cpu() for t in actual], expected)


def test_strided_rows(device) -> None:
    x = _rows(6, 256, torch.float16, device)[::2]  # every other row: row stride 512
    expected = quant.quantize_symmetric(x.cpu())
    _assert_quantized_close([t.cpu() for t in kernels.per_token_quant(x)], expected)
