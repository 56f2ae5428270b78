"""Offline batch driver: run a list of requests through the engine's step loop to completion.

Used by `Engine.generate` and `headrace generate`; detokenization and stop
strings happen here, as the worker's publish stage does them for Redis jobs.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from worker.engine.detokenizer import TextStream
from worker.engine.prompts import request_from_dict
from worker.engine.sequence import Completion, Request, TokenLogprobs, TokenOutput, Usage
from worker.errors import RequestError

if TYPE_CHECKING:
    from worker.engine.engine import Engine


@dataclass
class _Pending:
    request: Request
    text: TextStream
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)


def run_to_completion(engine: Engine, items: list[dict[str, Any] | Request]) -> list[Completion]:
    results: dict[int, Completion] = {}
    pending: dict[str, tuple[int, _Pending]] = {}
    for index, item in enumerate(items):
        try:
            request = item if isinstance(item, Request) else _to_request(engine, item)
            if request.request_id in pending:
                raise RequestError("invalid_request", f"duplicate id {request.request_id!r}")
            engine.add_request(request)
        except RequestError as exc:
            results[index] = _error_completion(_item_id(item), exc)
            continue
        text = TextStream(engine.tokenizer, request.prompt_token_ids, request.params)
        pending[request.request_id] = (index, _Pending(request, text))

    while engine.has_unfinished_requests():
        for out in engine.step():
            entry = pending.get(out.request_id)
            if entry is None:
                continue
            index, state = entry
            if out.error is not None:
                results[index] = _error_completion(out.request_id, out.error)
                del pending[out.request_id]
            elif _apply(engine, state, out):
                results[index] = _completion(state, out.finish_reason)
                del pending[out.request_id]
    return [results[i] for i in range(len(items))]


def _apply(engine: Engine, state: _Pending, out: TokenOutput) -> bool:
    """Fold one step's output into `state`; True when the request is done."""
    state.token_ids.extend(out.new_token_ids)
    state.logprobs.extend(out.logprobs)
    if out.new_token_ids and state.text.append(out.new_token_ids).stopped and not out.finished:
        engine.abort_request(state.request.request_id, reason="stop")
        return False  # the abort's output arrives on the next step
    return out.finished


def _completion(state: _Pending, finish_reason: str | None) -> Completion:
    state.text.finish()
    if state.text.stopped:
        finish_reason = "stop"  # a stop string matched in the same step the engine finished
    params = state.request.params
    return Completion(
        request_id=state.request.request_id,
        text=state.text.text,
        token_ids=tuple(state.token_ids),
        finish_reason=finish_reason or "stop",
        usage=Usage(len(state.request.prompt_token_ids), len(state.token_ids)),
        logprobs=tuple(state.logprobs) if params.logprobs is not None else None,
    )


def _to_request(engine: Engine, item: Any) -> Request:
    return request_from_dict(
        item,
        engine.tokenizer,
        max_model_len=engine.max_model_len,
        vocab_size=engine.vocab_size,
    )


def _item_id(item: Any) -> str:
    if isinstance(item, Request):
        return item.request_id
    if isinstance(item, dict) and isinstance(item.get("id"), (str, int)):
        return str(item["id"])
    return uuid.uuid4().hex


def _error_completion(request_id: str, exc: RequestError) -> Completion:
    return Completion(
        request_id=request_id,
        text="",
        token_ids=(),
        finish_reason="error",
        usage=Usage(0, 0),
        error=exc.to_dict(),
    )
