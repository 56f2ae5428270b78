"""Bulk line formats (producer side of `headrace bulk`): input lines → jobs, results → output lines.

Two input formats, detected once per file: the simple one (`{"id" | "custom_id",
"prompt" | "messages" | "prompt_token_ids", "params": {...}}`, params may also sit at
top level) and the OpenAI Batch API one (`{"custom_id", "method": "POST", "url":
"/v1/chat/completions" | "/v1/completions", "body": {...}}`). Output mirrors the input:
simple lines like `headrace generate` writes, OpenAI lines as the Batch API's output
file (`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`).

NOTE: ~360 lines: both input formats and their output mirrors, side by side on purpose.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from worker.errors import RequestError
from worker.params import (
    PARAM_NAMES,
    SamplingParams,
    check_length_hint,
    merge_line_params,
)
from worker.protocol import STATUS_CANCELLED, STATUS_OK, Result

SIMPLE = "simple"
OPENAI = "openai"
FORMATS = (SIMPLE, OPENAI)
CHAT_URL = "/v1/chat/completions"
TEXT_URL = "/v1/completions"

_PARAM_FIELDS = PARAM_NAMES
_PROMPT_KINDS = ("prompt", "messages", "prompt_token_ids")
_SIMPLE_FIELDS = frozenset({"id", "custom_id", "params", "length_hint", "priority", *_PROMPT_KINDS})
_OPENAI_FIELDS = frozenset({"custom_id", "method", "url", "body"})
# Body fields with the same name and meaning as ours, plus vLLM's extensions to the API.
_BODY_PASSTHROUGH = frozenset(
    {"max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty"}
    | {"frequency_penalty", "top_k", "min_p", "repetition_penalty", "min_tokens"}
    | {"ignore_eos", "stop_token_ids", "skip_special_tokens", "include_stop_str_in_output"}
)
_BODY_COMMON = _BODY_PASSTHROUGH | {"model", "n", "user", "stream"}
_CHAT_BODY = _BODY_COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
_TEXT_BODY = _BODY_COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"}
# Body fields accepted only at their no-op value (anything else is a feature we lack).
_NO_OP_VALUES = {"n": 1, "stream": False, "echo": False, "best_of": 1}
_CLIENT_ERRORS = frozenset(
    {"invalid_request", "invalid_params", "invalid_utf8", "payload_too_large", "empty_prompt"}
    | {"prompt_too_long"}
)


@dataclass(frozen=True)
class BulkItem:
    """One input line, parsed. `job` is an AsyncClient.submit_many item (without id);
    None when `error` says why the line cannot run.

    key: the line's id (what resume matches on): its id / custom_id, else `line-N`.
    key_field: the output field that carries `key` ("id" or "custom_id").
    url: OpenAI lines only, which endpoint the body was for; model: the body's model.
    """

    line_no: int
    key: str
    key_field: str
    job: dict[str, Any] | None = None
    error: RequestError | None = None
    url: str | None = None
    model: str | None = None


def detect_format(obj: Any) -> str:
    """OPENAI for a Batch API request line, SIMPLE otherwise."""
    if isinstance(obj, Mapping) and ("body" in obj or "url" in obj or "method" in obj):
        return OPENAI
    return SIMPLE


def load_line(raw: bytes) -> Any:
    """json.loads one input line; Raises RequestError (invalid_utf8 / invalid_request)."""
    try:
        return json.loads(raw)
    except UnicodeDecodeError as exc:
        raise RequestError("invalid_utf8", f"line is not valid UTF-8: {exc.reason}") from exc
    except json.JSONDecodeError as exc:
        raise RequestError("invalid_request", f"not valid JSON: {exc}") from exc


def parse_line(fmt: str, raw: bytes, line_no: int, defaults: Mapping[str, Any]) -> BulkItem:
    """One input line → a BulkItem (never raises: bad lines carry their error).

    defaults: sampling params each line's own params override.
    """
    key_field = "custom_id" if fmt == OPENAI else "id"
    fallback = BulkItem(line_no, f"line-{line_no}", key_field)
    try:
        obj = load_line(raw)
    except RequestError as exc:
        return _with_error(fallback, exc)
    if not isinstance(obj, dict):
        return _with_error(fallback, RequestError("invalid_request", "a line must be an object"))
    item = _keyed(fmt, obj, line_no)
    try:
        if fmt == OPENAI:
            job, url, model = _openai_job(obj, defaults)
            return BulkItem(line_no, item.key, item.key_field, job, url=url, model=model)
        return BulkItem(line_no, item.key, item.key_field, _simple_job(obj, defaults))
    except RequestError as exc:
        return _with_error(item, exc)


def _with_error(item: BulkItem, error: RequestError) -> BulkItem:
    return BulkItem(item.line_no, item.key, item.key_field, error=error, url=item.url)


def _keyed(fmt: str, obj: dict[str, Any], line_no: int) -> BulkItem:
    """The line's key: its usable id / custom_id, else `line-N` (stable across reruns)."""
    names = ("custom_id",) if fmt == OPENAI else ("id", "custom_id")
    for name in names:
        value = obj.get(name)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and value != "":
            return BulkItem(line_no, str(value), name)
    return BulkItem(line_no, f"line-{line_no}", names[0])


# -- simple format -------------------------------------------------------------------


def _simple_job(obj: dict[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(k for k in obj if k not in _SIMPLE_FIELDS and k not in _PARAM_FIELDS)
    if unknown:
        raise RequestError("invalid_request", f"unknown field {unknown[0]!r}")
    if "id" in obj and "custom_id" in obj:
        raise RequestError("invalid_request", "give id or custom_id, not both")
    job = _job(obj, merge_line_params(obj, defaults))
    if obj.get("length_hint") is not None:
        job["length_hint"] = check_length_hint(obj["length_hint"])
    priority = obj.get("priority")
    if priority is not None:
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise RequestError("invalid_request", "priority must be an integer")
        job["priority"] = priority  # routes the job to its level's stream (docs/protocol.md)
    return job


def _job(prompt: Mapping[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A submit_many item; checks what AsyncClient would otherwise raise on (the worker
    validates the rest and answers with an error result)."""
    kinds = [k for k in _PROMPT_KINDS if prompt.get(k) is not None]
    if len(kinds) != 1:
        raise RequestError(
            "invalid_request",
            f"give exactly one of prompt, messages, prompt_token_ids (got {kinds or 'none'})",
        )
    kind, value = kinds[0], prompt[kinds[0]]
    if kind == "prompt" and not isinstance(value, str):
        raise RequestError("invalid_request", "prompt must be a string")
    if kind == "messages":
        value = _messages(value)
    if kind == "prompt_token_ids" and not isinstance(value, list):
        raise RequestError("invalid_request", "prompt_token_ids must be a list of integers")
    SamplingParams.from_dict(params)  # raises invalid_params naming the field
    return {kind: value, "params": params}


def _messages(value: Any) -> list[dict[str, Any]]:
    """Messages with OpenAI content-part lists flattened to their text."""
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise RequestError("invalid_request", "messages must be a list of {role, content} maps")
    out = []
    for i, message in enumerate(value):
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise RequestError(
                    "invalid_request", f"messages[{i}]: only text parts are supported"
                )
            message = {**message, "content": "".join(str(p.get("text", "")) for p in content)}
        out.append(message)
    return out


# -- OpenAI Batch format ---------------------------------------------------------------


def _openai_job(
    obj: dict[str, Any], defaults: Mapping[str, Any]
) -> tuple[dict[str, Any], str, str | None]:
    unknown = sorted(k for k in obj if k not in _OPENAI_FIELDS)
    if unknown:
        raise RequestError("invalid_request", f"unknown field {unknown[0]!r}")
    if not isinstance(obj.get("custom_id"), str) or not obj["custom_id"]:
        raise RequestError("invalid_request", "custom_id must be a non-empty string")
    if obj.get("method", "POST") != "POST":
        raise RequestError("invalid_request", "method must be POST")
    url, body = obj.get("url"), obj.get("body")
    if url not in (CHAT_URL, TEXT_URL):
        raise RequestError("invalid_request", f"url must be {CHAT_URL} or {TEXT_URL}")
    if not isinstance(body, dict):
        raise RequestError("invalid_request", "body must be an object")
    body = {k: v for k, v in body.items() if v is not None}  # clients send null for "unset"
    allowed = _CHAT_BODY if url == CHAT_URL else _TEXT_BODY
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise RequestError("invalid_request", f"unsupported body field {unknown[0]!r}")
    for name, no_op in _NO_OP_VALUES.items():
        if name in body and body[name] != no_op:
            raise RequestError("invalid_request", f"only {name}={json.dumps(no_op)} is supported")
    if body.get("suffix"):
        raise RequestError("invalid_request", "suffix is not supported")
    params = {**defaults, **{k: v for k, v in body.items() if k in _BODY_PASSTHROUGH}}
    if url == CHAT_URL:
        prompt = {"messages": body.get("messages")}
        _chat_params(body, params)
    else:
        prompt = _text_prompt(body.get("prompt"))
        if "logprobs" in body:
            params["logprobs"] = body["logprobs"]
    model = body.get("model")
    return _job(prompt, params), url, model if isinstance(model, str) else None


def _chat_params(body: dict[str, Any], params: dict[str, Any]) -> None:
    if "max_completion_tokens" in body:
        params["max_tokens"] = body["max_completion_tokens"]
    logprobs, top = body.get("logprobs", False), body.get("top_logprobs")
    if not isinstance(logprobs, bool):
        raise RequestError("invalid_params", "logprobs must be a boolean")
    if top is not None and not logprobs:
        raise RequestError("invalid_params", "top_logprobs needs logprobs: true")
    if logprobs:
        params["logprobs"] = 0 if top is None else top


def _text_prompt(prompt: Any) -> dict[str, Any]:
    """Completions `prompt`: a string, a token list, or a batch of exactly one of those."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) != 1:
            raise RequestError("invalid_request", "only one prompt per request is supported")
        prompt = prompt[0]
    if isinstance(prompt, list):
        return {"prompt_token_ids": prompt}
    return {"prompt": prompt}


# -- output lines ------------------------------------------------------------------------


def result_line(fmt: str, item: BulkItem, job_id: str, result: Result) -> dict[str, Any]:
    """The output line of a job's final result (ok, error or cancelled)."""
    if result.status != STATUS_OK:
        error = result.error or {"code": STATUS_CANCELLED, "message": "the job was cancelled"}
        code, message = str(error.get("code", "internal")), str(error.get("message", ""))
        return error_line(fmt, item, RequestError(code, message), job_id)
    usage = result.usage or {}
    if fmt == OPENAI:
        return _openai_line(item, job_id, 200, _completion_body(item, job_id, result), None)
    line: dict[str, Any] = {
        item.key_field: item.key,
        "text": result.text or "",
        "token_ids": list(result.token_ids or ()),
        "finish_reason": result.finish_reason,
        "usage": {
            "prompt_tokens": usage.get("prompt_tokens", 0),
            "completion_tokens": usage.get("completion_tokens", 0),
        },
    }
    if result.logprobs is not None:
        line["logprobs"] = result.logprobs
    return line


def error_line(
    fmt: str, item: BulkItem, error: RequestError, job_id: str | None = None
) -> dict[str, Any]:
    """The output line of a line that could not be served."""
    if fmt != OPENAI:
        return {item.key_field: item.key, "error": error.to_dict()}
    client_side = error.code in _CLIENT_ERRORS
    body = {
        "error": {
            "message": error.message,
            "type": "invalid_request_error" if client_side else "server_error",
            "param": None,
            "code": error.code,
        }
    }
    status = 400 if client_side else 500
    return _openai_line(item, job_id or f"line-{item.line_no}", status, body, error.to_dict())


def _openai_line(
    item: BulkItem,
    job_id: str,
    status: int,
    body: dict[str, Any],
    error: dict[str, str] | None,
) -> dict[str, Any]:
    # `error` is set for failed lines too (vLLM's batch runner does the same), so tools
    # that look only at it and tools that look at status_code both see the failure.
    return {
        "id": f"batch_req_{job_id}",
        "custom_id": item.key,
        "response": {"status_code": status, "request_id": job_id, "body": body},
        "error": error,
    }


def _completion_body(item: BulkItem, job_id: str, result: Result) -> dict[str, Any]:
    usage = result.usage or {}
    prompt_tokens = int(usage.get("prompt_tokens", 0))
    completion_tokens = int(usage.get("completion_tokens", 0))
    chat = item.url == CHAT_URL
    choice: dict[str, Any] = {"index": 0}
    if chat:
        choice["message"] = {"role": "assistant", "content": result.text or ""}
    else:
        choice["text"] = result.text or ""
    choice["logprobs"] = _openai_logprobs(result.logprobs, chat)
    choice["finish_reason"] = result.finish_reason
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{job_id}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": item.model or "headrace",
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _openai_logprobs(logprobs: list[Any] | None, chat: bool) -> dict[str, Any] | None:
    """Our {token_id, logprob, top} list in OpenAI's shape. The producer has no tokenizer,
    so tokens are written `token_id:N` (vLLM's `return_tokens_as_token_ids` convention)."""
    if logprobs is None:
        return None
    tokens = [f"token_id:{lp['token_id']}" for lp in logprobs]
    tops = [[(f"token_id:{t}", v) for t, v in lp.get("top", [])] for lp in logprobs]
    if chat:
        content = [
            {
                "token": token,
                "logprob": lp["logprob"],
                "bytes": None,
                "top_logprobs": [{"token": t, "logprob": v, "bytes": None} for t, v in top],
            }
            for token, lp, top in zip(tokens, logprobs, tops, strict=True)
        ]
        return {"content": content, "refusal": None}
    return {
        "tokens": tokens,
        "token_logprobs": [lp["logprob"] for lp in logprobs],
        "top_logprobs": [dict(top) for top in tops],
    }
