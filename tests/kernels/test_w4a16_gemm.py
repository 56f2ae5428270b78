"""Triton W4A16 GEMM against the torch path (x @ dequantized weightᵀ)."""

from __future__ import annotations

import pytest
import torch

from ops import quant_int4
from tests.kernels.conftest import BF16_DOT

kernels = pytest.importorskip("kernels.w4a16_gemm", reason="triton is not installed")


def _case(m: int, k: int, n: int, group_size: int, dtype, scale_dtype, device, float_zeros=False):
    gen = torch.Generator().manual_seed(8)
    weight = quant_int4.quantize_weight_int4(
        torch.randn(n, k, generator=gen) * 0.05, group_size, scale_dtype, float_zeros
    )
    weight = quant_int4.Int4Weight(
        weight.packed.to(device), weight.scales.to(device), weight.zeros.to(device), group_size
    )
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    bias = torch.randn(n, generator=gen).to(dtype).to(device)
    # The torch path computed directly (the op dispatches to the kernel on CUDA).
    w = quant_int4.dequantize_int4(weight, torch.float32)
    expected = (x.float() @ w.t() + bias.float()).to(dtype)
    return x, weight, bias, expected


# K = 320 and 576 with groups of 128: the last group is short (64). M: 1, and ragged 19.
@pytest.mark.parametrize(
    "m,k,n,group_size", [(1, 320, 70, 128), (19, 576, 40, 128), (5, 96, 33, 32)]
)
@pytest.mark.parametrize("dtype", [torch.float16, BF16_DOT])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("float_zeros", [False, True], ids=["int-zero", "float-zero"])
def test_matches_torch(device, m, k, n, group_size, dtype, scale_dtype, float_zeros) -> None:
    x, weight, bias, expected = _case(m, k, n, group_size, dtype, scale_dtype, device, float_zeros)
    assert weight.zeros.dtype == (torch.float32 if float_zeros else torch.uint8)
    actual = kernels.w4a16_gemm(x, weight.packed, weight.scales, weight.zeros, group_size, bias)
    # Weights dequantize to x.dtype in the kernel, float32 in the reference.
    torch.testing.assert_close(actual, expected, atol=1e-2, rtol=1e-2)


def test_matches_the_cpu_op(device) -> None:
    x, weight, _, _ = _case(3, 256, 64, 128, torch.float16, torch.float16, device)
    kernel_out = kernels.w4a16_gemm(x, weight.packed, weight.scales, weight.zeros, 128)
    cpu_weight = quant_int4.Int4Weight(
        *(t.cpu() for t in (weight.packed, weight.scales, weight.zeros)), 128
    )
    torch.testing.assert_close(
        kernel_out.cpu().float(),
        quant_int4.w4a16_gemm(x.cpu().float(), cpu_weight),
        atol=1e-2,
        rtol=1e-2,
    )


# K = 320: 10 groups of 32 under 32-, 64- and 128-deep K tiles (a tile spans 1, 2 or 4
# groups; the last tile partly past the last group), 5 of 64; groups of 96 straddle tiles.
@pytest.mark.parametrize(
    "group_size,block_k", [(32, 32), (32, 64), (32, 128), (64, 128), (96, 128)]
)
def test_tiles_spanning_groups(device, group_size: int, block_k: int) -> None:
    x, weight, bias, expected = _case(
        4, 320, 48, group_size, torch.float16, torch.float16, device, True
    )
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": block_k, "GROUP_M": 1}
    actual = kernels.w4a16_gemm(
        x, weight.packed, weight.scales, weight.zeros, group_size, bias, config=config
    )
    torch.testing.assert_close(actual, expected, atol=1e-2, rtol=1e-2)


def test_odd_group_size_is_refused(device) -> None:
    x, weight, _, _ = _case(2, 96, 16, 32, torch.float16, torch.float16, device)
    with pytest.raises(ValueError, match="even"):
        kernels.w4a16_gemm(x, weight.packed, weight.scales[:, :1], weight.zeros[:, :1], 97)
