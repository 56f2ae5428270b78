"""ops.linear: half-precision models keep float32 GEMM weights on CPUs without native half GEMMs
(unless our packed GEMM runs bf16 there)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ops import linear as linear_ops
from worker.models.loader import load_model

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("kernel", ["", "avx2"])
def test_gemm_weight_dtype_follows_the_cpu(
    monkeypatch: pytest.MonkeyPatch, native: bool, kernel: str
) -> None:
    monkeypatch.setattr(linear_ops, "cpu_has_native_gemm", lambda dtype: native)
    monkeypatch.setattr(linear_ops, "gemm_kernel", lambda: kernel)
    # Our kernel widens bf16 weights in registers; without it, a GEMM the CPU cannot run in
    # bf16 runs on float32 copies.
    expected = torch.bfloat16 if native or kernel else torch.float32
    assert linear_ops.gemm_weight_dtype(torch.bfloat16, CPU) == expected
    expected = torch.float16 if native else torch.float32
    assert linear_ops.gemm_weight_dtype(torch.float16, CPU) == expected
    assert linear_ops.gemm_weight_dtype(torch.float32, CPU) == torch.float32
    # GPUs multiply half precision natively: never widened there.
    assert linear_ops.gemm_weight_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16


def test_widened_linear_is_the_half_precision_product_rounded_once() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 96, generator=gen).bfloat16()
    w = torch.randn(40, 96, generator=gen).bfloat16()
    b = torch.randn(40, generator=gen).bfloat16()
    out = linear_ops.linear(x, w.float(), b.float())
    assert out.dtype == torch.bfloat16 and out.shape == (7, 40)
    # bf16 x bf16 products are exact in float32: the same sum, rounded to bf16 at the end.
    expected = (x.double() @ w.double().t() + b.double()).bfloat16()
    assert (out.float() - expected.float()).abs().max() <= expected.float().abs().max() * 2**-7
    same = linear_ops.linear(x, w, b)
    torch.testing.assert_close(same, F.linear(x, w, b), rtol=0, atol=0)


def test_model_keeps_bf16_values_in_float32_gemm_weights(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir
) -> None:
    model_dir: Path = tiny_model_dir("llama")  # tied embeddings
    monkeypatch.setattr(linear_ops, "gemm_kernel", lambda: "")  # no packed bf16 GEMM either
    monkeypatch.setattr(linear_ops, "cpu_has_native_gemm", lambda dtype: True)
    native = load_model(model_dir, torch.bfloat16, CPU, 64)
    monkeypatch.setattr(linear_ops, "cpu_has_native_gemm", lambda dtype: False)
    widened = load_model(model_dir, torch.bfloat16, CPU, 64)
    assert native.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    for name in ("layers.0.self_attn.qkv_proj", "layers.1.mlp.gate_up_proj", "lm_head"):
        w_native = native.get_submodule(name).weight
        w_wide = widened.get_submodule(name).weight
        assert w_wide.dtype == torch.float32
        assert torch.equal(w_wide, w_native.float())  # same values, wider storage
    # The embedding table (tied to lm_head in the checkpoint) keeps the model dtype.
    assert widened.embed_tokens.weight.dtype == torch.bfloat16
    assert widened.args.tie_word_embeddings


def test_int8_gemm_without_vnni_matches_int_mm(monkeypatch: pytest.MonkeyPatch) -> None:
    from ops import quant

    gen = torch.Generator().manual_seed(1)
    a = torch.randint(-127, 128, (33, 576), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (48, 576), generator=gen, dtype=torch.int8)
    a_scale, b_scale = torch.rand(33, generator=gen), torch.rand(48, generator=gen)
    results = []
    for has_vnni in (True, False):
        monkeypatch.setattr(quant, "cpu_has_int8_gemm", lambda v=has_vnni: v)
        results.append(quant.int8_gemm(a, a_scale, b, b_scale, out_dtype=torch.float32))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
