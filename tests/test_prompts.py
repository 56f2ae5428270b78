"""Prompt encoding and JSONL line parsing against SmolLM2's real tokenizer and chat template."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from worker.engine.params import SamplingParams
from worker.engine.prompts import encode_prompt, request_from_dict
from worker.errors import RequestError

VOCAB = 49152
MAX_LEN = 64


@pytest.fixture(scope="module")
def tok(smollm2_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(smollm2_dir)


def encode(tok: PreTrainedTokenizerBase, max_model_len: int = MAX_LEN, **kw: object) -> list[int]:
    return encode_prompt(tok, max_model_len=max_model_len, vocab_size=VOCAB, **kw)


def parse(tok: PreTrainedTokenizerBase, raw: object, **kw: object):
    return request_from_dict(raw, tok, max_model_len=MAX_LEN, vocab_size=VOCAB, **kw)


def error_code(fn, *args: object, **kw: object) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn(*args, **kw)
    return info.value


def test_chat_template_renders_generation_prompt(tok: PreTrainedTokenizerBase) -> None:
    ids = encode(tok, max_model_len=4096, messages=[{"role": "user", "content": "Name a colour."}])
    text = tok.decode(ids, skip_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert text.startswith("<|im_start|>")
    assert "<|im_start|>user\nName a colour.<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert all(isinstance(t, int) for t in ids)


def test_chat_roles_and_order_are_kept(tok: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Again"},
    ]
    text = tok.decode(encode(tok, max_model_len=4096, messages=messages), skip_special_tokens=False)
    positions = [text.index(f"<|im_start|>{m['role']}\n{m['content']}") for m in messages]
    assert positions == sorted(positions)
    # The caller's system message replaces the template's default one.
    assert text.count("<|im_start|>system") == 1


def test_plain_prompt_uses_default_encoding(tok: PreTrainedTokenizerBase) -> None:
    assert encode(tok, prompt="Hello world") == tok.encode("Hello world")


@pytest.mark.parametrize(
    "text", ["你好，世界！今天天气很好。", "emoji 😀👍🏽 and 🇫🇷 flags", "café naïve"]
)
def test_multilingual_prompts_round_trip(tok: PreTrainedTokenizerBase, text: str) -> None:
    ids = encode(tok, prompt=text)
    assert tok.decode(ids) == text


def test_prompt_token_ids_pass_through(tok: PreTrainedTokenizerBase) -> None:
    assert encode(tok, prompt_token_ids=[0, 5, VOCAB - 1]) == [0, 5, VOCAB - 1]
    assert encode(tok, prompt_token_ids=(7, 8)) == [7, 8]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"prompt": "a", "messages": [{"role": "user", "content": "a"}]},
        {"prompt": "a", "prompt_token_ids": [1]},
        {"prompt": 5},
        {"prompt": ["a"]},
        {"messages": "hello"},
        {"messages": ["hello"]},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]},
        {"messages": [{"role": "user", "content": "x", "extra": 1}]},
        {"prompt_token_ids": "1 2 3"},
        {"prompt_token_ids": [1, "2"]},
        {"prompt_token_ids": [1, True]},
        {"prompt_token_ids": [1, 2.0]},
        {"prompt_token_ids": [-1]},
        {"prompt_token_ids": [VOCAB]},
    ],
)
def test_invalid_request(tok: PreTrainedTokenizerBase, kwargs: dict) -> None:
    assert error_code(encode, tok, **kwargs).code == "invalid_request"


@pytest.mark.parametrize("kwargs", [{"prompt": ""}, {"messages": []}, {"prompt_token_ids": []}])
def test_empty_prompt(tok: PreTrainedTokenizerBase, kwargs: dict) -> None:
    assert error_code(encode, tok, **kwargs).code == "empty_prompt"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prompt": "bad \ud800 surrogate"},
        {"messages": [{"role": "user", "content": "lone \udfff"}]},
    ],
)
def test_lone_surrogates_are_invalid_utf8(tok: PreTrainedTokenizerBase, kwargs: dict) -> None:
    assert error_code(encode, tok, **kwargs).code == "invalid_utf8"


def test_prompt_too_long_leaves_room_for_one_token(tok: PreTrainedTokenizerBase) -> None:
    assert len(encode(tok, prompt_token_ids=[5] * (MAX_LEN - 1))) == MAX_LEN - 1
    err = error_code(encode, tok, prompt_token_ids=[5] * MAX_LEN)
    assert err.code == "prompt_too_long"
    assert str(MAX_LEN) in err.message and "64 tokens" in err.message
    long_text = " ".join(["word"] * 200)
    err = error_code(encode, tok, prompt=long_text)
    assert err.code == "prompt_too_long"
    assert f"{len(tok.encode(long_text))} tokens" in err.message


def test_missing_chat_template(smollm2_dir: Path) -> None:
    bare = AutoTokenizer.from_pretrained(smollm2_dir)
    bare.chat_template = None
    err = error_code(encode, bare, messages=[{"role": "user", "content": "hi"}])
    assert err.code == "invalid_request" and "chat template" in err.message


def test_line_with_ids_and_params(tok: PreTrainedTokenizerBase) -> None:
    req = parse(tok, {"id": 7, "prompt": "Hi there", "params": {"temperature": 0.0}})
    assert req.request_id == "7"
    assert req.prompt_token_ids == tuple(tok.encode("Hi there"))
    assert req.params.temperature == 0.0 and req.params.max_tokens == SamplingParams().max_tokens


def test_line_id_fallbacks(tok: PreTrainedTokenizerBase) -> None:
    generated = {parse(tok, {"prompt": "x"}).request_id for _ in range(3)}
    assert len(generated) == 3
    assert all(len(rid) == 32 and int(rid, 16) >= 0 for rid in generated)
    assert parse(tok, {"prompt": "x"}, request_id="line-3").request_id == "line-3"
    assert parse(tok, {"id": "a", "prompt": "x"}, request_id="line-3").request_id == "a"
    for bad in (True, "", 1.5, ["a"]):
        assert error_code(parse, tok, {"id": bad, "prompt": "x"}).code == "invalid_request"


def test_line_params_override_defaults(tok: PreTrainedTokenizerBase) -> None:
    defaults = SamplingParams(max_tokens=16, temperature=0.5, stop=("END",), seed=3)
    raw = {"messages": [{"role": "user", "content": "hi"}], "params": {"temperature": 0.0}}
    raw["max_tokens"] = 4
    params = parse(tok, raw, defaults=defaults).params
    assert params == SamplingParams(max_tokens=4, temperature=0.0, stop=("END",), seed=3)
    # Without line params the defaults come through unchanged.
    assert parse(tok, {"prompt": "x"}, defaults=defaults).params == defaults


def test_line_errors(tok: PreTrainedTokenizerBase) -> None:
    err = error_code(parse, tok, {"prompt": "x", "max_token": 4})
    assert err.code == "invalid_request" and "max_token" in err.message
    assert error_code(parse, tok, ["prompt", "x"]).code == "invalid_request"
    assert error_code(parse, tok, {"id": 1}).code == "invalid_request"
    assert error_code(parse, tok, {"prompt": "x", "params": 3}).code == "invalid_params"
    assert error_code(parse, tok, {"prompt": "x", "params": {"nope": 1}}).code == "invalid_params"
    assert error_code(parse, tok, {"prompt": "x", "temperature": -1}).code == "invalid_params"
    both = {"prompt": "x", "max_tokens": 3, "params": {"max_tokens": 4}}
    err = error_code(parse, tok, both)
    assert err.code == "invalid_params" and "max_tokens" in err.message
    assert error_code(parse, tok, {"prompt": ""}).code == "empty_prompt"
    assert error_code(parse, tok, {"prompt_token_ids": [1] * MAX_LEN}).code == "prompt_too_long"
