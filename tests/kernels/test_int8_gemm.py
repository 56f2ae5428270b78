"""Triton W8A8 GEMM against the torch path (`torch._int_mm` + the same scale epilogue)."""

from __future__ import annotations

import pytest
import torch

from ops import quant

kernels = pytest.importorskip("kernels.int8_gemm", reason="triton is not installed")


def _operands(m: int, k: int, n: int, device, transposed_b: bool = False):
    gen = torch.Generator().manual_seed(5)
    a = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    if transposed_b:
        b = b.t().contiguous().t()  # [N, K] view of a [K, N] buffer
    a_scale = torch.rand(m, generator=gen) * 0.02 + 1e-3
    b_scale = torch.rand(n, generator=gen) * 0.01 + 1e-4
    bias = torch.randn(n, generator=gen)
    return [t.to(device) for t in (a, a_scale, b, b_scale, bias)]


def _torch_int8_gemm(a, a_scale, b, b_scale, bias, out_dtype):
    """ops.quant.int8_gemm's CPU path, run on CPU copies (the op itself dispatches on CUDA)."""
    args = [None if t is None else t.cpu() for t in (a, a_scale, b, b_scale, bias)]
    return quant.int8_gemm(*args, out_dtype=out_dtype).to(a.device)


# M: 1 (decode), 19 and 130 (not multiples of the row tile); K: ragged against BLOCK_K.
@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (19, 200, 70), (130, 576, 96)])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_matches_torch(device, m: int, k: int, n: int, out_dtype) -> None:
    a, a_scale, b, b_scale, bias = _operands(m, k, n, device)
    expected = _torch_int8_gemm(a, a_scale, b, b_scale, bias, out_dtype)
    actual = kernels.int8_gemm(a, a_scale, b, b_scale, bias, out_dtype)
    # int32 accumulation is exact on both sides; only the final rounding may differ.
    torch.testing.assert_close(
        actual, expected, atol=1e-5, rtol=1e-2 if out_dtype != torch.float32 else 1e-6
    )


def test_strided_weight_small_tiles_no_bias(device) -> None:
    a, a_scale, b, b_scale, _ = _operands(37, 300, 50, device, transposed_b=True)
    config = {
        "BLOCK_M": 16,
        "BLOCK_N": 32,
        "BLOCK_K": 32,
        "GROUP_M": 2,
        "num_warps": 4,
        "num_stages": 2,
    }
    expected = _torch_int8_gemm(a, a_scale, b, b_scale, None, torch.float32)
    actual = kernels.int8_gemm(a, a_scale, b, b_scale, None, torch.float32, config=config)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-6)


def test_rejects_float_operands(device) -> None:
    a, a_scale, b, b_scale, _ = _operands(4, 32, 16, device)
    with pytest.raises(ValueError, match="int8"):
        kernels.int8_gemm(a.float(), a_scale, b, b_scale)
