"""The CPU (torch) paths of the quantized linear ops against plain float arithmetic."""

from __future__ import annotations

import pytest
import torch

from ops import quant, quant_int4
from worker.models.llama import RMSNorm


def _gen(seed: int = 11) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_symmetric_quantization_error_is_half_a_step() -> None:
    x = torch.randn(9, 300, generator=_gen()) * torch.logspace(-3, 2, 9)[:, None]
    codes, scale = quant.quantize_symmetric(x)
    assert codes.dtype == torch.int8 and scale.shape == (9,)
    assert codes.abs().amax(-1).eq(127).all()  # the row's max maps to ±127
    error = (codes.float() * scale[:, None] - x).abs()
    assert (error <= scale[:, None] * 0.5 + 1e-7 * x.abs()).all()


def test_int8_gemm_equals_float_matmul_of_dequantized_operands() -> None:
    gen = _gen()
    a = torch.randint(-127, 128, (33, 200), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (70, 200), generator=gen, dtype=torch.int8)
    a_scale, b_scale, bias = (
        torch.rand(33, generator=gen),
        torch.rand(70, generator=gen),
        torch.randn(70),
    )
    out = quant.int8_gemm(a, a_scale, b, b_scale, bias, torch.float32)
    expected = (a.double() * a_scale[:, None].double()) @ (
        b.double() * b_scale[:, None].double()
    ).t()
    torch.testing.assert_close(out, (expected + bias.double()).float(), rtol=1e-5, atol=1e-4)


def test_w8a8_linear_close_to_float_linear() -> None:
    gen = _gen()
    x = torch.randn(2, 9, 576, generator=gen).to(torch.bfloat16)
    w = torch.randn(192, 576, generator=gen) * 0.05
    out = quant.w8a8_linear(x, quant.quantize_weight_int8(w))
    expected = x.float() @ w.t()
    assert out.shape == (2, 9, 192) and out.dtype == torch.bfloat16
    rel = (out.float() - expected).norm() / expected.norm()
    assert rel < 0.02, rel


def test_rmsnorm_quant_is_the_models_rmsnorm_quantized() -> None:
    gen = _gen()
    x = torch.randn(6, 576, generator=gen)
    norm = RMSNorm(576, 1e-5)
    norm.weight.data = torch.rand(576, generator=gen) + 0.5
    codes, scale = quant.rmsnorm_quant(x, norm.weight.data, 1e-5)
    want_codes, want_scale = quant.quantize_symmetric(norm(x).detach())
    torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=0)
    assert (codes.int() - want_codes.int()).abs().max() <= 1


def test_int4_pack_unpack_round_trip_and_nibble_order() -> None:
    q = torch.randint(0, 16, (5, 12), generator=_gen(), dtype=torch.uint8)
    packed = quant_int4.pack_int4(q)
    assert packed.shape == (5, 6) and packed.dtype == torch.uint8
    assert torch.equal(packed[:, 0] & 0xF, q[:, 0]) and torch.equal(packed[:, 0] >> 4, q[:, 1])
    assert torch.equal(quant_int4.unpack_int4(packed), q)


@pytest.mark.parametrize("k", [256, 320])  # 320: a short last group of 64
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
def test_int4_quantization_error_is_half_a_step(k: int, scale_dtype) -> None:
    w = torch.randn(24, k, generator=_gen()) * 0.05 + 0.01
    w[3, :128] += 1.0  # an all-positive group: the range must still hold 0
    q = quant_int4.quantize_weight_int4(w, 128, scale_dtype)
    assert q.scales.shape == (24, -(-k // 128)) and q.scales.dtype == scale_dtype
    assert q.zeros.max() <= 15 and q.in_features == k and q.out_features == 24
    step = q.scales.float().repeat_interleave(128, dim=1)[:, :k]
    error = (quant_int4.dequantize_int4(q) - w).abs()
    assert (error <= step * 0.5 + 1e-6).all()


def test_w4a16_gemm_is_matmul_with_dequantized_weight() -> None:
    gen = _gen()
    w = quant_int4.quantize_weight_int4(torch.randn(40, 320, generator=gen), 128)
    x = torch.randn(3, 320, generator=gen)
    bias = torch.randn(40, generator=gen)
    out = quant_int4.w4a16_gemm(x, w, bias)
    torch.testing.assert_close(
        out, x @ quant_int4.dequantize_int4(w).t() + bias, rtol=1e-5, atol=1e-4
    )


def test_int4_rejects_odd_k() -> None:
    with pytest.raises(ValueError, match="even"):
        quant_int4.quantize_weight_int4(torch.randn(4, 33), 32)
