"""Offline batch driver: run a list of requests through the engine's step loop to completion.

Used by `Engine.generate` and `headrace generate`; the fold of each request's outputs
(text, stop strings, logprobs) is `worker.engine.output`'s, shared with the worker's
publish stage.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any, Protocol

from worker.engine.output import OutputAccumulator
from worker.engine.prompts import request_from_dict
from worker.engine.sequence import Completion, Request, TokenOutput, Usage
from worker.errors import RequestError


class StepEngine(Protocol):
    """What the batch driver needs of an engine (`Engine` is one): a protocol, so this
    module does not import the engine module that calls it."""

    tokenizer: Any
    max_model_len: int
    vocab_size: int

    def add_request(self, request: Request) -> None: ...

    def abort_request(self, request_id: str, reason: str = ...) -> None: ...

    def has_unfinished_requests(self) -> bool: ...

    def step(self) -> Iterable[TokenOutput]: ...


def run_to_completion(
    engine: StepEngine, items: list[dict[str, Any] | Request]
) -> list[Completion]:
    results: dict[int, Completion] = {}
    pending: dict[str, tuple[int, OutputAccumulator]] = {}
    for index, item in enumerate(items):
        try:
            request = item if isinstance(item, Request) else _to_request(engine, item)
            if request.request_id in pending:
                raise RequestError("invalid_request", f"duplicate id {request.request_id!r}")
            engine.add_request(request)
        except RequestError as exc:
            results[index] = _error_completion(_item_id(item), exc)
            continue
        pending[request.request_id] = (index, OutputAccumulator(request, engine.tokenizer))

    while engine.has_unfinished_requests():
        for out in engine.step():
            entry = pending.get(out.request_id)
            if entry is None:
                continue
            index, output = entry
            if out.error is not None:
                results[index] = _error_completion(out.request_id, out.error)
                del pending[out.request_id]
            elif _apply(engine, output, out):
                results[index] = output.completion(out.finish_reason)
                del pending[out.request_id]
    return [results[i] for i in range(len(items))]


def _apply(engine: StepEngine, output: OutputAccumulator, out: TokenOutput) -> bool:
    """Fold one step's output; True when the request is done."""
    delta = output.add(out)
    if out.new_token_ids and delta.stopped and not out.finished:
        engine.abort_request(output.request.request_id, reason="stop")
        return False  # the abort's output arrives on the next step
    return out.finished


def _to_request(engine: StepEngine, item: Any) -> Request:
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
