"""Triton RMSNorm + per-token int8 quantization (and plain per-token quant) against torch."""

from __future__ import annotations

import pytest
import torch

from ops import quant
from ops.rotation import hadamard, rotate, rotation_block

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


# W8A8 as served: SmoothQuant division and block Hadamard rotation fused into the quantization.
# K: SmolLM2's 576 (block 64, padded to 16 blocks), 1536 (not a power of two), 96 (block 32).
@pytest.mark.parametrize("k", [576, 1536, 96])
@pytest.mark.parametrize("smoothed", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_smooth_rotate_quant_matches_torch(device, k: int, smoothed: bool, dtype) -> None:
    x = _rows(7, k, dtype, device)
    x[2, 5] = 300.0  # an outlier channel: the rotation spreads it over its block
    gen = torch.Generator().manual_seed(8)
    smooth = (torch.rand(k, generator=gen) * 4 + 0.25) if smoothed else None
    block = rotation_block(k)
    expected = _reference_activations(x.cpu(), smooth, block)
    actual = kernels.smooth_rotate_quant(
        x, None if smooth is None else smooth.to(device), hadamard(block, device)
    )
    _assert_quantized_close([t.cpu() for t in actual], expected)
    # ops dispatches to the same kernel on CUDA and to the reference on CPU.
    via_ops = quant.quantize_activations(x, None if smooth is None else smooth.to(device), block)
    _assert_quantized_close([t.cpu() for t in via_ops], expected)


def _reference_activations(x: torch.Tensor, smooth: torch.Tensor | None, block: int):
    """The unfused sequence W8A8Linear ran before: divide, rotate, quantize per token."""
    x32 = x.float() if smooth is None else x.float() / smooth
    return quant.quantize_symmetric(rotate(x32, block))


def test_smooth_rotate_quant_rejects_bad_rotation(device) -> None:
    x = _rows(2, 96, torch.float32, device)
    with pytest.raises(ValueError, match="power of two >= 16"):
        kernels.smooth_rotate_quant(x, None, hadamard(8, device))  # too small for tl.dot
    with pytest.raises(ValueError, match="power of two >= 16"):
        kernels.smooth_rotate_quant(x, None, hadamard(64, device))  # does not divide 96
