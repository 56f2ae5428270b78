"""`headrace generate` end to end through `worker.cli.main`, on a tiny model and on SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from worker.cli import main
from worker.config import CacheConfig, EngineConfig, ModelConfig
from worker.engine.engine import Engine
from worker.engine.prompts import request_from_dict

REPO = Path(__file__).resolve().parents[2]


def _write_lines(path: Path, lines: list[object]) -> Path:
    text = "".join(
        (x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines
    )
    path.write_text(text, encoding="utf-8")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_generate_tiny_llama_runs_good_lines_and_reports_bad_ones(
    tiny_model_dir, tmp_path: Path
) -> None:
    model = tiny_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(model)
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    inputs = _write_lines(
        tmp_path / "in.jsonl",
        [
            {"id": "plain", "prompt": "Hello there", "params": {"ignore_eos": True}},
            {"id": "chat", "messages": messages, "params": {"max_tokens": 3, "ignore_eos": True}},
            {"id": "ids", "prompt_token_ids": [504, 3575, 282], "ignore_eos": True},
            "{not json",
            {"id": "bad-param", "prompt": "hi", "params": {"bogus": 1}},
            {"id": "too-long", "prompt_token_ids": [5] * 100},
            "",
            {"id": "empty", "prompt": ""},
            {"id": "lp", "prompt": "Count: 1, 2,", "params": {"logprobs": 2, "max_tokens": 2}},
        ],
    )
    out = tmp_path / "sub" / "out.jsonl"
    argv = ["generate", "--model", str(model), "--dtype", "float32", "--input", str(inputs)]
    argv += ["--output", str(out), "--max-tokens", "5", "--temperature", "0"]
    argv += ["--max-model-len", "64", "--kv-cache-memory", "0.01"]
    assert main(argv) == 0

    results = _read_jsonl(out)
    assert [r["id"] for r in results] == [
        "plain", "chat", "ids", "line-4", "bad-param", "too-long", "empty", "lp"
    ]  # fmt: skip
    by_id = {r["id"]: r for r in results}
    assert by_id["line-4"]["error"]["code"] == "invalid_request"
    assert by_id["bad-param"]["error"]["code"] == "invalid_params"
    assert "bogus" in by_id["bad-param"]["error"]["message"]
    assert by_id["too-long"]["error"]["code"] == "prompt_too_long"
    assert by_id["empty"]["error"]["code"] == "empty_prompt"

    # CLI flags are the defaults; per-line params override them.
    assert len(by_id["plain"]["token_ids"]) == 5 and by_id["plain"]["finish_reason"] == "length"
    assert len(by_id["chat"]["token_ids"]) == 3
    assert len(by_id["ids"]["token_ids"]) == 5
    chat_prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert by_id["chat"]["usage"]["prompt_tokens"] == len(chat_prompt)
    assert by_id["plain"]["usage"] == {
        "prompt_tokens": len(tokenizer.encode("Hello there")),
        "completion_tokens": 5,
    }
    for key in ("plain", "chat", "ids", "lp"):
        r = by_id[key]
        assert r["text"] == tokenizer.decode(r["token_ids"], skip_special_tokens=True)
        assert "logprobs" not in r or key == "lp"
    lp = by_id["lp"]["logprobs"]
    assert [e["token_id"] for e in lp] == by_id["lp"]["token_ids"]
    assert all(len(e["top"]) == 2 and e["logprob"] <= 0 for e in lp)
    # Greedy: the chosen token is the most likely one.
    assert all(e["top"][0][0] == e["token_id"] for e in lp)


def test_generate_writes_stdout_and_rejects_bad_flags(
    tiny_model_dir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(tiny_model_dir("llama"))
    inputs = _write_lines(tmp_path / "in.jsonl", [{"id": 7, "prompt": "Hi", "max_tokens": 2}])
    base = ["generate", "--model", model, "--dtype", "float32", "--input", str(inputs)]
    base += ["--output", "-", "--kv-cache-memory", "0.01"]
    assert main([*base, "--temperature", "0"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(results) == 1 and results[0]["id"] == "7"
    assert results[0]["usage"]["completion_tokens"] == len(results[0]["token_ids"]) <= 2

    assert main([*base, "--temperature", "-1"]) == 2
    assert capsys.readouterr().out == ""


def test_generate_smollm2_equals_engine_generate(smollm2_dir: Path, tmp_path: Path) -> None:
    params = {"temperature": 0, "max_tokens": 6}
    items = [
        {"id": "zh", "messages": [{"role": "user", "content": "你好，请介绍一下你自己。"}]},
        {"id": "emoji", "prompt": "I love 🍕 and"},
    ]
    inputs = _write_lines(tmp_path / "in.jsonl", [*items, {"id": "bad", "prompt": 3}])
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", str(smollm2_dir), "--dtype", "float32", "--input", str(inputs)]
    argv += ["--output", str(out), "--temperature", "0", "--max-tokens", "6"]
    argv += ["--kv-cache-memory", "0.05"]
    assert main(argv) == 0
    results = _read_jsonl(out)
    assert results[-1] == {
        "id": "bad",
        "error": {"code": "invalid_request", "message": "prompt must be a string"},
    }

    config = EngineConfig(
        model=ModelConfig(source=str(smollm2_dir), dtype="float32"),
        cache=CacheConfig(memory_gib=0.05),
    )
    expected = Engine(config).generate([{**item, "params": params} for item in items])
    for got, want in zip(results[:-1], expected, strict=True):
        assert got["id"] == want.request_id
        assert got["token_ids"] == list(want.token_ids) and len(got["token_ids"]) > 0
        assert got["text"] == want.text
        assert got["finish_reason"] == want.finish_reason


def test_example_prompts_are_valid_requests(smollm2_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    lines = (REPO / "examples" / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
    requests = [
        request_from_dict(
            json.loads(line), tokenizer, max_model_len=8192, vocab_size=len(tokenizer)
        )
        for line in lines
    ]
    assert len(requests) >= 10
    assert len({r.request_id for r in requests}) == len(requests)


def test_help_lists_the_verbs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "generate" in out and "bench" in out
