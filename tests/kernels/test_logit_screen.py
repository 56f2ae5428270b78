"""The int8 logit screen (kernels/cpu/logit_screen.cpp) against the argmax of float32 logits.

The screen must give the exact argmax wherever int8 logits cannot tell tokens apart: near-
duplicate lm_head rows, a hidden state with an outlier channel, rows whose int8 argmax is
wrong. It must ignore columns past `vocab`, follow torch.argmax on NaN rows, and run for
hidden sizes whose rotation block is not 64.
"""

from __future__ import annotations

import pytest
import torch

from ops.logit_screen import (
    build_logit_screen,
    screened_argmax,
    screened_argmax_reference,
)
from tests.markers import needs_packed_gemm

pytestmark = needs_packed_gemm


def _weight(vocab: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, k, generator=gen) * 0.05
    # Near-duplicates of row 7: their logits differ by far less than the int8 error.
    w[8:24] = w[7] + torch.randn(16, k, generator=gen) * 1e-4
    return w.to(dtype)


def _hidden(rows: int, k: int, dtype: torch.dtype, weight: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, k, generator=gen) * 2.0
    x[:, 3] = 45.0  # an outlier channel, as in SmolLM2's final hidden state
    x[0] = weight[7].float() * 40  # aims at the near-duplicates
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [64, 96, 576])
def test_screen_is_the_exact_argmax(dtype: torch.dtype, k: int) -> None:
    w = _weight(2048, k, dtype)
    screen = build_logit_screen(w)
    assert screen is not None
    assert screen.rotation == {64: 64, 96: 32, 576: 64}[k]
    for rows in (1, 5, 33):
        x = _hidden(rows, k, dtype, w)
        got = screened_argmax(x, screen, 2048)
        assert got.dtype == torch.int64
        assert torch.equal(got, screened_argmax_reference(x, w, 2048))


def test_screen_overrules_wrong_int8_argmaxes() -> None:
    # Every row aims at row 7 and its near-duplicates: int8 logits rank them at random.
    w = _weight(1024, 64, torch.float32)
    gen = torch.Generator().manual_seed(2)
    x = w[7] * 40 + torch.randn(64, 64, generator=gen) * 0.05
    screen = build_logit_screen(w)
    assert screen is not None
    exact = screened_argmax_reference(x, w, 1024)
    wrong = _int8_logits(x, screen).argmax(dim=-1) != exact
    assert wrong.sum() >= 8  # the int8 logits alone pick another token on these rows
    assert torch.equal(screened_argmax(x, screen, 1024), exact)


def _int8_logits(x: torch.Tensor, screen) -> torch.Tensor:
    from ops.quant import quantize_activations
    from ops.rotation import rotate

    codes, scale = quantize_activations(rotate(x, screen.rotation).contiguous())
    return torch.ops.headrace_cpu.packed_linear_int8(
        codes, scale, screen.packed, screen.scale, screen.weight.shape[0], None, torch.float32
    )


def test_screen_ignores_columns_past_vocab() -> None:
    w = _weight(300, 64, torch.float32)
    w[290] = w[7] * 50  # the best column, but not a token the sampler may pick
    screen = build_logit_screen(w)
    assert screen is not None
    x = _hidden(4, 64, torch.float32, w)
    assert screened_argmax_reference(x, w, 300)[0] == 290
    got = screened_argmax(x, screen, 280)
    assert (got < 280).all()
    assert torch.equal(got, screened_argmax_reference(x, w, 280))


def test_screen_follows_torch_argmax_on_non_finite_rows() -> None:
    w = _weight(512, 64, torch.float32)
    screen = build_logit_screen(w)
    assert screen is not None
    x = _hidden(3, 64, torch.float32, w)
    x[1, 10] = float("nan")
    x[2, 4] = float("inf")
    got = screened_argmax(x, screen, 512)
    ref = screened_argmax_reference(x, w, 512)
    assert got.tolist() == ref.tolist()


def test_screen_of_no_rows() -> None:
    w = _weight(256, 64, torch.bfloat16)
    screen = build_logit_screen(w)
    assert screen is not None
    assert screened_argmax(torch.empty(0, 64, dtype=torch.bfloat16), screen, 256).shape == (0,)
