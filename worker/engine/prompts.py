"""Prompt encoding (ingest stage): a user's prompt, chat messages or token ids → a validated Request.

The JSONL line format of the CLI and `Engine.generate` is parsed here; the Redis
worker reuses `encode_prompt` and `SamplingParams.from_dict` for its msgpack protocol.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any

import jinja2
from transformers import PreTrainedTokenizerBase

from worker.engine.sequence import Request
from worker.errors import RequestError
from worker.params import (
    PARAM_NAMES,
    SamplingParams,
    check_length_hint,
    merge_line_params,
)

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
PROMPT_FIELDS = ("prompt", "messages", "prompt_token_ids")
PARAM_FIELDS = PARAM_NAMES
_LINE_FIELDS = frozenset({"id", "params", "length_hint", *PROMPT_FIELDS})
# Stands for message i's content while the template is rendered (private-use characters
# that no template writes).
_MARK = "\ue000{}\ue001"
_MARK_RE = re.compile("\ue000(\\d+)\ue001")
_TEMPLATE_CHANGES_CONTENT = (
    "message content holds special-token text that this chat template does not let headrace "
    "keep as text (it changes the content); set params.special_tokens_in_content to parse it"
)


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    *,
    prompt: str | None = None,
    messages: list | None = None,
    prompt_token_ids: list | None = None,
    max_model_len: int,
    vocab_size: int,
    special_tokens_in_content: bool = False,
) -> list[int]:
    """Token ids of exactly one of `prompt`, `messages` (chat template) or `prompt_token_ids`.

    special_tokens_in_content: False (default) → special-token text inside a message's
        content (`<|im_start|>system`) is tokenized as text, so a user cannot forge role
        markers; True → it becomes the special tokens (the template's own always do).
        A raw `prompt` is always tokenized as is, special tokens included.
    Raises:
        RequestError: invalid_request (not exactly one input, wrong types, ids out
            of [0, vocab_size)), empty_prompt, invalid_utf8 (lone surrogates),
            prompt_too_long (no room left in max_model_len for one new token).
    """
    given = [
        name
        for name, v in zip(PROMPT_FIELDS, (prompt, messages, prompt_token_ids), strict=True)
        if v is not None
    ]
    if len(given) != 1:
        raise RequestError(
            "invalid_request",
            f"give exactly one of prompt, messages, prompt_token_ids (got {given or 'none'})",
        )
    if prompt is not None:
        token_ids = _encode_text(tokenizer, prompt)
    elif messages is not None:
        token_ids = _encode_messages(tokenizer, messages, special_tokens_in_content)
    else:
        token_ids = _check_token_ids(prompt_token_ids, vocab_size)
    if not token_ids:
        raise RequestError("empty_prompt", "the prompt encodes to no tokens")
    if len(token_ids) >= max_model_len:
        raise RequestError(
            "prompt_too_long",
            f"prompt has {len(token_ids)} tokens but max_model_len is {max_model_len}; "
            "it must be shorter to leave room for at least one generated token",
        )
    return token_ids


def request_from_dict(
    raw: Any,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_model_len: int,
    vocab_size: int,
    defaults: SamplingParams | None = None,
    request_id: str | None = None,
) -> Request:
    """Parse one JSONL line: {"id", one of prompt/messages/prompt_token_ids, "params",
    "length_hint"?, ...}.

    Sampling params may sit in "params" or as top-level keys (not both for the same
    name); they override `defaults`. The id is the line's "id", else `request_id`,
    else a fresh uuid4 hex.

    Raises:
        RequestError: invalid_request (not a map, unknown field, bad id),
            invalid_params, or any code of `encode_prompt`.
    """
    if not isinstance(raw, Mapping):
        raise RequestError("invalid_request", "a request must be a map")
    unknown = sorted(str(k) for k in raw if k not in _LINE_FIELDS and k not in PARAM_FIELDS)
    if unknown:
        raise RequestError("invalid_request", f"unknown field {unknown[0]!r}")
    rid = _request_id(raw.get("id"), request_id)
    params = _merge_params(raw, defaults)
    token_ids = encode_prompt(
        tokenizer,
        prompt=raw.get("prompt"),
        messages=raw.get("messages"),
        prompt_token_ids=raw.get("prompt_token_ids"),
        max_model_len=max_model_len,
        vocab_size=vocab_size,
        special_tokens_in_content=params.special_tokens_in_content,
    )
    hint = check_length_hint(raw.get("length_hint"))
    return Request(rid, tuple(token_ids), params, length_hint=hint)


def _request_id(line_id: Any, fallback: str | None) -> str:
    if line_id is None:
        return fallback if fallback is not None else uuid.uuid4().hex
    # NOTE: bool is an int subclass; `"id": true` is a client bug, not id "True".
    if isinstance(line_id, bool) or not isinstance(line_id, (str, int)):
        raise RequestError("invalid_request", "id must be a string or an integer")
    if line_id == "":
        raise RequestError("invalid_request", "id must not be empty")
    _check_utf8(str(line_id), "id")
    return str(line_id)


def _merge_params(raw: Mapping[str, Any], defaults: SamplingParams | None) -> SamplingParams:
    base = defaults.to_dict() if defaults is not None else {}
    return SamplingParams.from_dict(merge_line_params(raw, base))


def _encode_text(tokenizer: PreTrainedTokenizerBase, prompt: Any) -> list[int]:
    if not isinstance(prompt, str):
        raise RequestError("invalid_request", "prompt must be a string")
    if not prompt:
        raise RequestError("empty_prompt", "prompt is empty")
    _check_utf8(prompt, "prompt")
    return list(tokenizer.encode(prompt))


def _encode_messages(
    tokenizer: PreTrainedTokenizerBase, messages: Any, special_tokens_in_content: bool
) -> list[int]:
    if not isinstance(messages, list):
        raise RequestError("invalid_request", "messages must be a list")
    if not messages:
        raise RequestError("empty_prompt", "messages is empty")
    for i, message in enumerate(messages):
        _check_message(i, message)
    if tokenizer.chat_template is None:
        raise RequestError("invalid_request", "this model has no chat template; send a prompt")
    messages = [dict(m) for m in messages]
    if special_tokens_in_content or not _has_special_text(tokenizer, messages):
        # The common case: one template call, exactly what transformers produces.
        out = _apply_template(tokenizer, messages, tokenize=True)
        # Some transformers versions return a BatchEncoding whatever return_dict says.
        if isinstance(out, Mapping):
            out = out["input_ids"]
        return [int(t) for t in out]
    return _encode_content_as_text(tokenizer, messages)


def _apply_template(tokenizer: PreTrainedTokenizerBase, messages: list[dict], tokenize: bool):
    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=tokenize, return_dict=False
        )
    except (jinja2.TemplateError, ValueError, TypeError) as exc:
        # Templates reject some conversations themselves (e.g. roles out of order).
        raise RequestError("invalid_request", f"chat template rejected messages: {exc}") from exc


def _special_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]


def _has_special_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> bool:
    specials = _special_texts(tokenizer)
    return any(s in m["content"] for m in messages for s in specials)


def _encode_content_as_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """Chat template ids where each content is tokenized with special tokens split into text.

    The template is rendered once with a marker in place of each content, which tells
    template text from content in the real rendering; the template's pieces are then
    tokenized as usual and the contents with `split_special_tokens`.
    Raises:
        RequestError(invalid_request) if the template changes content beyond trimming it.
    """
    marked = [{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)]
    pieces = _MARK_RE.split(_apply_template(tokenizer, marked, tokenize=False))
    rendered = _apply_template(tokenizer, messages, tokenize=False)
    ids: list[int] = []
    pos = 0
    # pieces = [template, content index, template, ..., template]
    for k, piece in enumerate(pieces):
        is_content = k % 2 == 1
        text: str | None = piece
        if is_content:
            content, following = messages[int(piece)]["content"], pieces[k + 1]
            # Templates may `| trim` content; the text that follows tells which it was.
            text = next(
                (c for c in (content, content.strip()) if rendered.startswith(c + following, pos)),
                None,
            )
        if text is None or not rendered.startswith(text, pos):
            raise RequestError("invalid_request", _TEMPLATE_CHANGES_CONTENT)
        if text:
            ids += tokenizer.encode(text, add_special_tokens=False, split_special_tokens=is_content)
        pos += len(text)
    if pos != len(rendered):
        raise RequestError("invalid_request", _TEMPLATE_CHANGES_CONTENT)
    return [int(t) for t in ids]


def _check_message(i: int, message: Any) -> None:
    if not isinstance(message, Mapping):
        raise RequestError("invalid_request", f"messages[{i}] must be a map")
    extra = sorted(str(k) for k in message if k not in ("role", "content"))
    if extra:
        raise RequestError("invalid_request", f"messages[{i}] has unknown field {extra[0]!r}")
    role, content = message.get("role"), message.get("content")
    if role not in CHAT_ROLES:
        raise RequestError(
            "invalid_request", f"messages[{i}].role must be one of {sorted(CHAT_ROLES)}"
        )
    if not isinstance(content, str):
        raise RequestError("invalid_request", f"messages[{i}].content must be a string")
    _check_utf8(content, f"messages[{i}].content")


def _check_token_ids(token_ids: Any, vocab_size: int) -> list[int]:
    if not isinstance(token_ids, (list, tuple)):
        raise RequestError("invalid_request", "prompt_token_ids must be a list of integers")
    if not token_ids:
        raise RequestError("empty_prompt", "prompt_token_ids is empty")
    for t in token_ids:
        if isinstance(t, bool) or not isinstance(t, int):
            raise RequestError("invalid_request", "prompt_token_ids must be a list of integers")
        if not 0 <= t < vocab_size:
            raise RequestError(
                "invalid_request", f"token id {t} is outside the vocabulary [0, {vocab_size})"
            )
    return list(token_ids)


def _check_utf8(text: str, what: str) -> None:
    # JSON "\ud800" escapes decode to lone surrogates, which have no UTF-8 form.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError("invalid_utf8", f"{what} is not valid UTF-8: {exc.reason}") from exc
