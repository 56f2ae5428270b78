"""Weight quantization: the W8A8/W4A16 modules, SmoothQuant, load-time quantization in the
engine, and `headrace quantize` checkpoints read back by the loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from ops.quant_int4 import dequantize_int4, quantize_weight_int4, quantize_weight_int4_clipped
from worker.cli import main
from worker.config import CacheConfig, EngineConfig, ModelConfig
from worker.engine.engine import Engine
from worker.engine.sequence import Request
from worker.models.gptq import gptq_quantize_int4
from worker.models.quantized import W4A16Linear, W8A8Linear, quantizable_linears
from worker.models.smoothquant import smoothing_factors
from worker.params import SamplingParams

TEXT = (
    "The quick brown fox jumps over the lazy dog. Water boils at 100 degrees Celsius at sea "
    "level, and photosynthesis converts light into chemical energy. Once upon a time, there "
    "was a little girl who lived in a village near the forest."
)
MODULES = {"w8a8": W8A8Linear, "w4a16": W4A16Linear}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _linear(k: int, n: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    """Non-square, with output rows of very different magnitudes (a wrong scale axis shows)."""
    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.normal_().mul_(torch.rand(n, 1) * 2 + 0.1)
        if bias:
            linear.bias.normal_()
    return linear.requires_grad_(False)


def _engine(model_dir: Path, quantization: str = "none") -> Engine:
    model = ModelConfig(source=str(model_dir), dtype="float32", quantization=quantization)
    return Engine(EngineConfig(model=model, cache=CacheConfig(num_blocks=64)))


def _score(engine: Engine, text: str = TEXT) -> torch.Tensor:
    return engine.score(engine.tokenizer(text).input_ids)


def _greedy(engine: Engine, prompts: list[str], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = [tuple(engine.tokenizer(p).input_ids) for p in prompts]
    requests = [Request(str(i), x, params) for i, x in enumerate(ids)]
    return [list(c.token_ids) for c in engine.generate(requests)]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return nn.functional.cosine_similarity(a, b, dim=-1)  # per position


# -- modules ------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_w8a8_linear_matches_float_linear(tokens: int) -> None:
    linear = _linear(320, 192)
    x = torch.randn(tokens, 320)
    module = W8A8Linear.from_linear(linear)
    out = module(x)
    assert out.shape == (tokens, 192) and out.dtype == torch.float32
    assert _rel_err(out, linear(x)) < 0.02  # int8 per channel/token: ~1%
    assert module(x.bfloat16()).dtype == torch.bfloat16
    assert set(module.state_dict()) == {"qweight", "scale", "bias"}
    assert module.qweight.dtype == torch.int8 and module.qweight.shape == (192, 320)


@pytest.mark.parametrize("group_size", [32, 128])
def test_w4a16_linear_matches_float_linear(group_size: int) -> None:
    linear = _linear(320, 192)  # 320 = 2.5 groups of 128: a short last group
    x = torch.randn(9, 320)
    module = W4A16Linear.from_linear(linear, group_size=group_size)
    out = module(x)
    assert out.shape == (9, 192) and out.dtype == torch.float32
    assert _rel_err(out, linear(x)) < 0.13  # 4-bit groups: ~8-10%
    weight = dequantize_int4(module.quantized_weight())  # exactly what the module multiplies by
    torch.testing.assert_close(out, x @ weight.t() + linear.bias, rtol=1e-5, atol=1e-4)
    assert set(module.state_dict()) == {"packed", "scales", "zeros", "bias"}


def test_smoothquant_lowers_w8a8_error_on_outlier_channels() -> None:
    linear = _linear(256, 128, bias=False, seed=1)
    outliers = [3, 77, 150, 200]

    def activations(seed: int) -> torch.Tensor:
        x = torch.randn(64, 256, generator=torch.Generator().manual_seed(seed))
        x[:, outliers] *= 60  # the textbook case: a few channels dwarf the rest
        return x

    calib, x = activations(0), activations(1)
    s = smoothing_factors(calib.abs().amax(dim=0), linear.weight, alpha=0.5)
    plain = _rel_err(W8A8Linear.from_linear(linear)(x), linear(x))
    smoothed_module = W8A8Linear.from_linear(linear, s)
    smoothed = _rel_err(smoothed_module(x), linear(x))
    assert smoothed < 0.01 and smoothed < plain / 3  # measured: 0.007 vs 0.027
    assert "smooth" in smoothed_module.state_dict()


def test_smoothing_factors_formula() -> None:
    weight = torch.tensor([[1.0, -4.0, 0.5], [0.25, 2.0, -0.5]])  # column abs-max: 1, 4, 0.5
    act = torch.tensor([4.0, 1.0, 0.0])
    s = smoothing_factors(act, weight, alpha=0.5)
    # sqrt(4) / sqrt(1) = 2; sqrt(1) / sqrt(4) = 0.5; an inactive channel is left alone.
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="alpha"):
        smoothing_factors(act, weight, alpha=1.5)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
def test_int4_clip_search_never_increases_a_groups_error(scale_dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(48, 320, generator=gen) * 0.05  # 320: a short last group of 64
    w[torch.rand(w.shape, generator=gen) < 0.01] *= 12  # a few outliers: worth clipping
    plain, clipped = (
        quantize_weight_int4(w, 128, scale_dtype),
        quantize_weight_int4_clipped(w, 128, scale_dtype),
    )
    assert clipped.packed.shape == plain.packed.shape and clipped.scales.dtype == scale_dtype
    assert clipped.zeros.max() <= 15

    def group_errors(q) -> torch.Tensor:  # [N, 3] squared error per group
        sq = (dequantize_int4(q) - w).square()
        return torch.stack([g.sum(-1) for g in sq.split(128, dim=1)], dim=1)

    before, after = group_errors(plain), group_errors(clipped)
    assert (after <= before * (1 + 1e-6)).all()
    assert after.sum() < 0.95 * before.sum()  # it does clip: measured -7.5%


def _correlated_inputs(k: int, tokens: int, seed: int) -> torch.Tensor:
    """[tokens, k] activations with correlated channels and a few large ones, like an LLM's."""
    gen = torch.Generator().manual_seed(0)  # the same mixing for every seed
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    scale = torch.ones(k)
    scale[:: k // 8] = 8.0
    return (torch.randn(tokens, k, generator=torch.Generator().manual_seed(seed)) @ mix) * scale


def test_gptq_lowers_held_out_output_error_vs_round_to_nearest() -> None:
    linear = _linear(320, 96, bias=False, seed=3)
    calib, held_out = _correlated_inputs(320, 1024, 1), _correlated_inputs(320, 256, 2)
    gptq = gptq_quantize_int4(linear.weight, calib.t() @ calib, 128)
    assert gptq.zeros.max() <= 15 and gptq.scales.shape == (96, 3) and gptq.group_size == 128
    ref = linear(held_out)

    def err(q) -> float:
        return _rel_err(held_out @ dequantize_int4(q).t(), ref)

    rtn, clipped = (
        err(quantize_weight_int4(linear.weight)),
        err(quantize_weight_int4_clipped(linear.weight)),
    )
    assert err(gptq) < 0.9 * min(rtn, clipped)  # measured: 0.078 vs 0.101 (RTN), 0.094 (clipped)
    # An input channel never active in calibration has no Hessian mass: still quantizes.
    calib[:, 5] = 0
    assert torch.isfinite(
        dequantize_int4(gptq_quantize_int4(linear.weight, calib.t() @ calib))
    ).all()


# -- load-time quantization in the engine ---------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: qkv bias, untied lm_head
@pytest.mark.parametrize("scheme", ["w8a8", "w4a16"])
def test_engine_quantized_at_load_generates(arch: str, scheme: str, tiny_model_dir) -> None:
    engine = _engine(tiny_model_dir(arch), scheme)
    model = engine.runner.model
    assert all(isinstance(m, MODULES[scheme]) for _, m in quantizable_linears(model))
    assert not isinstance(model.lm_head, (W8A8Linear, W4A16Linear))
    assert model.lm_head.weight.dtype == torch.float32
    assert (model.layers[0].self_attn.qkv_proj.bias is not None) == (arch == "qwen2")
    [out] = _greedy(engine, ["Hello there"], max_tokens=5)
    assert len(out) == 5
    # w8a8 at load is SmoothQuant-calibrated on the built-in text: every module smooths,
    # and rotates its input (the tiny models' K are multiples of 64).
    assert all((m.smooth is not None) == (scheme == "w8a8") for _, m in quantizable_linears(model))
    if scheme == "w8a8":
        assert {m.rotation for _, m in quantizable_linears(model)} == {64}
    if scheme == "w8a8":  # int8 barely moves a float32 model's logits
        reference = _score(_engine(tiny_model_dir(arch)))
        assert _cosine(_score(engine), reference).min() > 0.99


@pytest.fixture(scope="module")
def smollm2_float(smollm2_dir: Path) -> tuple[torch.Tensor, list[list[int]], Engine]:
    engine = _engine(smollm2_dir)
    return _score(engine), _greedy(engine, SMOLLM2_PROMPTS, max_tokens=4), engine


SMOLLM2_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    "]


def _greedy_deficits(reference: Engine, prompt: str, tokens: list[int]) -> list[float]:
    """How far below the reference model's best logit each generated token was, step by step
    (teacher-forced on `tokens`): 0 where the reference would have chosen the same token."""
    ids = list(reference.tokenizer(prompt).input_ids)
    logits = reference.score(ids + tokens)[len(ids) - 1 : len(ids) - 1 + len(tokens)]
    chosen = logits.gather(-1, torch.tensor(tokens)[:, None])[:, 0]
    return (logits.max(-1).values - chosen).tolist()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("scheme", "min_top1", "prompts", "max_deficit"),
    # Measured on TEXT (50 positions): w8a8 top-1 0.94-0.98, mean cosine 0.999; w4a16 0.62
    # and 0.79 (the GGUF weights are already 4-bit on another grid, so int4 re-quantizes
    # them lossily). A transposed weight or a wrong scale axis gives ~0 agreement.
    # Greedy continuations need not match the float ones token for token: SmolLM2's first
    # token after the code prompt is a near tie in float32 (753 vs 3987: 0.04 apart), which
    # int8 rounding may break either way. Each generated token must instead be one the float
    # model ranks within `max_deficit` of its best (measured: w8a8 at most 0.04; w4a16 0 on
    # the prose prompt, 2.2 on the code one).
    [("w8a8", 0.75, 2, 0.25), ("w4a16", 0.5, 1, 0.5)],
)
def test_smollm2_quantized_agrees_with_float(
    scheme: str,
    min_top1: float,
    prompts: int,
    max_deficit: float,
    smollm2_dir: Path,
    smollm2_float,
) -> None:
    reference, _, float_engine = smollm2_float
    engine = _engine(smollm2_dir, scheme)
    logits = _score(engine)
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert top1 >= min_top1
    assert _cosine(logits, reference).mean() > (0.95 if scheme == "w8a8" else 0.5)
    generated = _greedy(engine, SMOLLM2_PROMPTS[:prompts], max_tokens=4)
    for prompt, tokens in zip(SMOLLM2_PROMPTS, generated, strict=False):
        deficits = _greedy_deficits(float_engine, prompt, tokens)
        assert max(deficits) <= max_deficit, (prompt, tokens, deficits)


# -- `headrace quantize` checkpoints --------------------------------------------------------


def _quantize(model_dir: Path, out: Path, scheme: str, *extra: str) -> int:
    argv = ["quantize", "--model", str(model_dir), "--scheme", scheme, "--output", str(out)]
    return main([*argv, "--dtype", "float32", *extra])


@pytest.mark.parametrize("scheme", ["w8a8", "w4a16"])
def test_quantize_round_trip_equals_load_time_quantization(
    scheme: str, tiny_model_dir, tmp_path: Path
) -> None:
    source, out = tiny_model_dir("llama"), tmp_path / "q"
    assert _quantize(source, out, scheme) == 0
    meta = json.loads((out / "config.json").read_text())["headrace_quantization"]
    group_size = 128 if scheme == "w4a16" else None
    assert meta == {  # as at load: w8a8 calibrated on the built-in text
        "scheme": scheme,
        "group_size": group_size,
        "smoothquant_alpha": 0.5 if scheme == "w8a8" else None,
        "gptq": scheme == "w8a8",
        "rotation": 64 if scheme == "w8a8" else 0,
        "float_zeros": False,
        "format_version": 2,
    }
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())  # noqa: SIM118 - safe_open is not a mapping
    quantized = {"qweight", "scale"} if scheme == "w8a8" else {"packed", "scales", "zeros"}
    assert {f"model.layers.0.self_attn.qkv_proj.{n}" for n in quantized} <= names
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # tied
    assert not any(".weight" in n and "_proj" in n for n in names)

    expected = _score(_engine(source, scheme))
    assert torch.equal(_score(_engine(out)), expected)
    assert torch.equal(_score(_engine(out, scheme)), expected)  # naming its own scheme is fine
    other = "w4a16" if scheme == "w8a8" else "w8a8"
    with pytest.raises(ValueError, match=f"is a {scheme} checkpoint"):
        _engine(out, other)


def test_quantize_with_smoothquant_calibration(tiny_model_dir, tmp_path: Path) -> None:
    source, out = tiny_model_dir("qwen2"), tmp_path / "q"
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT * 4)
    assert _quantize(source, out, "w8a8", "--calib", str(calib), "--alpha", "0.6") == 0
    meta = json.loads((out / "config.json").read_text())["headrace_quantization"]
    assert meta["smoothquant_alpha"] == 0.6
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())  # noqa: SIM118 - safe_open is not a mapping
    assert {"lm_head.weight", "model.layers.1.self_attn.qkv_proj.bias"} <= names  # untied, bias
    assert "model.layers.1.mlp.down_proj.smooth" in names
    engine = _engine(out)
    assert engine.runner.model.layers[0].mlp.down_proj.smooth is not None
    reference = _score(_engine(source))
    assert _cosine(_score(engine), reference).min() > 0.99


def test_quantize_w4a16_with_calibration_runs_gptq(tiny_model_dir, tmp_path: Path) -> None:
    source, out = tiny_model_dir("llama"), tmp_path / "q"
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT * 4)
    assert _quantize(source, out, "w4a16", "--calib", str(calib)) == 0
    meta = json.loads((out / "config.json").read_text())["headrace_quantization"]
    assert meta["gptq"] is True and meta["group_size"] == 128
    engine = _engine(out)
    assert all(isinstance(m, W4A16Linear) for _, m in quantizable_linears(engine.runner.model))
    reference, rtn = _score(_engine(source)), _score(_engine(source, "w4a16"))
    # GPTQ fits the calibration inputs: closer to the float model than RTN on that text.
    assert (_score(engine) - reference).norm() < (rtn - reference).norm()


def test_quantize_rejects_bad_requests(tiny_model_dir, tmp_path: Path) -> None:
    source, calib = tiny_model_dir("llama"), tmp_path / "calib.txt"
    calib.write_text(TEXT)
    assert _quantize(source, tmp_path / "a", "w8a8", "--calib", str(tmp_path / "none")) == 2
    assert _quantize(source, tmp_path / "b", "w4a16", "--group-size", "48") == 2
    occupied = tmp_path / "c"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    assert _quantize(source, occupied, "w8a8") == 2
    assert not (tmp_path / "a").exists() and (occupied / "keep.txt").read_text() == "mine"
    assert _quantize(source, tmp_path / "d", "w8a8") == 0
    assert _quantize(tmp_path / "d", tmp_path / "e", "w4a16") == 2  # already quantized
    with pytest.raises(SystemExit) as exc:
        _quantize(source, tmp_path / "f", "int3")
    assert exc.value.code == 2


# -- W4A16 with real zero points (w4a16-g32) ------------------------------------------------


def _q4_1_weight(n: int, k: int, seed: int) -> torch.Tensor:
    """A dequantized GGUF Q4_1 tensor: per block of 32 along K, `code * d + m`, codes 0..15
    with both ends used (llama.cpp sets d = (max - min) / 15, m = min), d and m float16."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k // 32, 32), generator=gen).float()
    codes[..., 0], codes[..., 1] = 0, 15
    d = (torch.rand(n, k // 32, 1, generator=gen) * 0.02 + 0.001).half().float()
    m = (-torch.rand(n, k // 32, 1, generator=gen) * 0.1).half().float()
    return (codes * d + m).view(n, k)


def test_float_zero_int4_reproduces_a_q4_1_weight() -> None:
    w = _q4_1_weight(48, 320, seed=7)
    exact = quantize_weight_int4(w, 32, float_zeros=True)
    assert exact.zeros.dtype == torch.float32 and exact.zeros.shape == (48, 10)
    torch.testing.assert_close(dequantize_int4(exact), w, rtol=0, atol=1e-6)
    # Integer zero points must round the block's offset to the grid: no longer exact.
    integer = dequantize_int4(quantize_weight_int4(w, 32))
    assert (integer - w).abs().max() > 1e-3
    # On ordinary weights a real zero point is never worse than the integer one per group.
    g = torch.randn(48, 320, generator=torch.Generator().manual_seed(8))
    for size in (32, 128):
        err_float = (dequantize_int4(quantize_weight_int4(g, size, float_zeros=True)) - g).norm()
        assert err_float <= (dequantize_int4(quantize_weight_int4(g, size)) - g).norm()


def test_w4a16_g32_checkpoint_round_trip_keeps_float_zeros(tiny_model_dir, tmp_path: Path) -> None:
    source, out = tiny_model_dir("llama"), tmp_path / "q"
    assert _quantize(source, out, "w4a16-g32") == 0
    meta = json.loads((out / "config.json").read_text())["headrace_quantization"]
    assert (meta["scheme"], meta["group_size"], meta["float_zeros"]) == ("w4a16", 32, True)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        zeros = f.get_tensor("model.layers.0.mlp.down_proj.zeros")
    assert zeros.dtype == torch.float32
    expected = _score(_engine(source, "w4a16-g32"))
    engine = _engine(out)
    module = engine.runner.model.layers[0].mlp.down_proj
    assert isinstance(module, W4A16Linear) and module.zeros.dtype == torch.float32
    assert torch.equal(_score(engine), expected)
    assert _quantize(source, tmp_path / "bad", "w4a16-g32", "--group-size", "64") == 2


def test_smollm2_w4a16_g32_is_lossless(smollm2_dir: Path, smollm2_float) -> None:
    """SmolLM2's float weights are a dequantized Q4_1 (blocks of 32): groups of 32 with real
    zero points land on the same grid, so the quantized model computes the float one."""
    reference, reference_tokens, _ = smollm2_float
    engine = _engine(smollm2_dir, "w4a16-g32")
    logits = _score(engine)
    assert (logits.argmax(-1) == reference.argmax(-1)).all()
    torch.testing.assert_close(logits, reference, rtol=0, atol=2e-3)
    assert _greedy(engine, SMOLLM2_PROMPTS, max_tokens=4) == reference_tokens
