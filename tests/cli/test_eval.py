"""`headrace eval`: metrics on hand-built logits, segmentation, the default text, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from bench.eval import (
    CONFIGS,
    DEFAULT_TEXT,
    TARGETS,
    EvalResult,
    Target,
    evaluate,
    next_token_stats,
    paragraph_language,
    perplexity,
    split_segments,
    top1_agreement,
)
from bench.sensitivity import perturb_projections, restore_projections, weight_noise
from worker.cli import main
from worker.cli.eval import EVAL_CONFIGS
from worker.config import EngineConfig, ModelConfig
from worker.engine.engine import Engine

SHORT_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife.\n\n晋太元中，武陵人捕鱼为业。缘溪行，忘路之远近。"
)


def test_metrics_on_hand_built_logits() -> None:
    # Rows 0..3 predict tokens 1..4; the last row predicts nothing and is dropped.
    logits = torch.full((5, 4), -10.0)
    for row, top in enumerate((2, 0, 3, 1, 0)):
        logits[row, top] = 5.0
    argmax, nll = next_token_stats(logits, torch.tensor([9, 2, 0, 1, 1]))
    assert argmax.tolist() == [2, 0, 3, 1]
    assert top1_agreement(argmax, torch.tensor([2, 0, 0, 0])) == pytest.approx(0.5)
    # Right, right, wrong, right: three confident hits and one confident miss.
    log_z = math.log(math.exp(5.0) + 3 * math.exp(-10.0))
    expected = [log_z - 5.0, log_z - 5.0, log_z + 10.0, log_z - 5.0]
    assert nll.tolist() == pytest.approx(expected)
    assert perplexity(nll) == pytest.approx(math.exp(sum(expected) / 4))
    # Uniform logits over V tokens: perplexity V.
    _, nll = next_token_stats(torch.zeros(7, 50), torch.arange(7))
    assert perplexity(nll) == pytest.approx(50.0)


def test_targets_and_verdicts() -> None:
    assert set(TARGETS) == {"int8-kv", "w8a8+int8-kv", "w4a16", "w4a16-g32"}
    assert set(TARGETS) <= set(CONFIGS)
    assert tuple(CONFIGS) == EVAL_CONFIGS  # the CLI's torch-free copy
    target = Target(min_top1=0.99, max_ppl_increase=0.01)
    ok = EvalResult("int8-kv", 0.995, ppl=10.05, ppl_ref=10.0, tokens=100, target=target)
    assert ok.passed and ok.ppl_increase == pytest.approx(0.005)
    assert EvalResult("int8-kv", 0.98, 10.0, 10.0, 100, target=target).passed is False
    assert EvalResult("int8-kv", 1.0, 10.2, 10.0, 100, target=target).passed is False
    assert EvalResult("int8-kv", 1.0, 9.0, 10.0, 100, target=target).passed  # lower ppl is fine
    untargeted = EvalResult("w8a8", 0.9, 11.0, 10.0, 100).to_dict()
    assert untargeted["passed"] is None and untargeted["ppl_increase_pct"] == pytest.approx(10.0)


def test_split_segments_by_language_and_length() -> None:
    assert paragraph_language("Four score and seven years ago") == "en"
    assert paragraph_language("子曰：“学而时习之，不亦说乎？”") == "zh"

    def encode(s: str) -> list[int]:  # one "token" per character
        return [ord(c) for c in s]

    text = "aaaa\n\nbbbb\n\n\n中文中文\n\n  \n\n" + "c" * 25 + "\n\nd"
    segments = split_segments(text, encode, max_tokens=10)
    assert [(s.language, len(s.token_ids)) for s in segments] == [
        ("en", 10),  # "aaaa\n\nbbbb" packed together
        ("zh", 4),  # a language change closes the segment
        ("en", 10),  # the 25-character paragraph cut into windows of 10
        ("en", 10),
        ("en", 5),
    ]  # and "d" alone is dropped: one token predicts nothing
    assert all(len(s.token_ids) <= 10 for s in segments)
    with pytest.raises(ValueError):
        split_segments(text, encode, max_tokens=1)


def test_default_text_is_long_enough_in_both_languages(smollm2_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    segments = split_segments(
        DEFAULT_TEXT.read_text(encoding="utf-8"),
        lambda s: tokenizer(s, add_special_tokens=False).input_ids,
        max_tokens=512,
    )
    tokens = {"en": 0, "zh": 0}
    for segment in segments:
        tokens[segment.language] += len(segment.token_ids)
    assert sum(tokens.values()) >= 2000 and min(tokens.values()) >= 1000, tokens


def test_reference_against_itself_agrees_exactly(tiny_model_dir) -> None:
    (result,) = evaluate(
        str(tiny_model_dir("llama")), "float32", ["reference"], SHORT_TEXT, chunk_size=8
    )
    assert result.top1_agreement == 1.0 and result.ppl == result.ppl_ref
    assert result.passed is None and set(result.by_language) == {"en", "zh"}
    assert result.tokens == sum(s["tokens"] for s in result.by_language.values()) > 20


def test_cli_json_and_table(
    tiny_model_dir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "text.txt"
    text.write_text(SHORT_TEXT, encoding="utf-8")
    argv = ["eval", "--model", str(tiny_model_dir("llama")), "--text", str(text)]
    argv += ["--configs", "reference", "--chunk-size", "8", "--check"]
    assert main([*argv, "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert {"config", "top1_agreement", "ppl", "ppl_ref"} <= set(row)
    assert row["config"] == "reference" and row["top1_agreement"] == 1.0
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "reference" in table and "100.00%" in table


def test_int8_kv_agrees_with_the_reference_on_smollm2(smollm2_dir: Path) -> None:
    (result,) = evaluate(str(smollm2_dir), "float32", ["int8-kv"], SHORT_TEXT, chunk_size=8)
    assert result.top1_agreement >= 0.9, result
    assert abs(result.ppl_increase) <= 0.05, result


def test_weight_noise_moves_predictions_more_as_it_grows(tiny_model_dir) -> None:
    model_dir = str(tiny_model_dir("llama"))
    small, large = weight_noise(model_dir, "float32", [0.01, 1.0], SHORT_TEXT * 3, chunk_size=8)
    assert (small.config, large.config) == ("noise-1%", "noise-100%")
    assert small.target is None and large.passed is None
    assert large.top1_agreement < small.top1_agreement <= 1.0
    assert abs(large.ppl_increase) > abs(small.ppl_increase)
    # Perturbation is undone exactly: the engine scores as before afterwards.
    engine = Engine(EngineConfig(model=ModelConfig(model_dir, dtype="float32")))
    ids = engine.tokenizer(SHORT_TEXT).input_ids
    before = engine.score(ids)
    originals = perturb_projections(engine.runner.model, 0.1, seed=0)
    assert not torch.equal(engine.score(ids), before)
    restore_projections(engine.runner.model, originals)
    assert torch.equal(engine.score(ids), before)


def test_cli_weight_noise_rows_and_bad_levels(
    tiny_model_dir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "text.txt"
    text.write_text(SHORT_TEXT, encoding="utf-8")
    argv = ["eval", "--model", str(tiny_model_dir("llama")), "--text", str(text), "--json"]
    argv += ["--configs", "reference", "--chunk-size", "8"]
    assert main([*argv, "--weight-noise", "0.05"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["config"] for r in rows] == ["reference", "noise-5%"]
    assert main([*argv, "--weight-noise", "0"]) == 2
