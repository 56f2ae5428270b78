"""The engine thread: a request the step fails on is reported as a failure, alone; a step that
fails engine-wide fails every active request once and the thread keeps serving."""

from __future__ import annotations

import asyncio

import pytest

from worker.engine.engine import Engine
from worker.engine.sequence import Request
from worker.errors import RequestError
from worker.params import SamplingParams
from worker.service.engine_loop import EngineEvent, EngineLoop

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
FAIL_AT = 2


def _requests(engine: Engine) -> list[Request]:
    texts = ["Hello there", "The capital of France is", "bad", "1, 2, 3, 4,", "Once upon a time"]
    ids = ["a", "b", "bad", "c", "d"]
    return [
        Request(rid, tuple(engine.tokenizer.encode(text)), GREEDY)
        for rid, text in zip(ids, texts, strict=True)
    ]


def _serve(engine: Engine, requests: list[Request]) -> list[EngineEvent]:
    """Run `requests` through an EngineLoop until each finished or failed; every event, in order."""

    async def main() -> list[EngineEvent]:
        events: list[EngineEvent] = []
        open_ids = {r.request_id for r in requests}
        done = asyncio.Event()

        def on_event(event: EngineEvent) -> None:
            events.append(event)
            open_ids.difference_update(o.request_id for o in event.outputs if o.finished)
            open_ids.difference_update(rid for rid, _ in event.failures)
            if not open_ids:
                done.set()

        engine_loop = EngineLoop(engine, asyncio.get_running_loop(), on_event)
        engine_loop.start()
        for request in requests:
            engine_loop.add(request)
        try:
            await asyncio.wait_for(done.wait(), timeout=60)
        finally:
            engine_loop.stop(timeout=10)
        assert not engine_loop.alive
        return events

    return asyncio.run(main())


def _tokens(events: list[EngineEvent]) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for event in events:
        for out in event.outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def _failures(events: list[EngineEvent]) -> list[tuple[str, RequestError]]:
    return [failure for event in events for failure in event.failures]


def _assert_idle(engine: Engine) -> None:
    stats = engine.stats()
    assert not engine.has_unfinished_requests()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_a_request_the_step_fails_on_fails_alone(engine, monkeypatch) -> None:
    requests = _requests(engine)
    baseline = _tokens(_serve(engine, [r for r in requests if r.request_id != "bad"]))

    sampler = engine.sampler

    def failing(logits, seqs, eos_token_ids):
        if any(s.request_id == "bad" and s.num_output_tokens >= FAIL_AT for s in seqs):
            raise IndexError("injected")
        return sampler(logits, seqs, eos_token_ids)

    monkeypatch.setattr(engine, "sampler", failing)
    events = _serve(engine, requests)

    [(rid, error)] = _failures(events)
    assert rid == "bad" and error.code == "internal"
    assert error.message == "the engine failed on this request (IndexError)"
    tokens = _tokens(events)
    assert len(tokens.pop("bad")) == FAIL_AT
    assert tokens == baseline
    finished = [o for e in events for o in e.outputs if o.finished]
    assert sorted(o.request_id for o in finished) == sorted(baseline)
    assert all(o.finish_reason == "length" and o.error is None for o in finished)
    _assert_idle(engine)


def test_an_engine_wide_step_failure_fails_each_active_request_once(engine, monkeypatch) -> None:
    requests = _requests(engine)

    def broken():
        raise RuntimeError("injected: scheduler")

    monkeypatch.setattr(engine.scheduler, "schedule", broken)
    events = _serve(engine, requests)

    failures = _failures(events)
    assert sorted(rid for rid, _ in failures) == sorted(r.request_id for r in requests)
    assert {(e.code, e.message) for _, e in failures} == {
        ("internal", "engine step failed (RuntimeError)")
    }
    assert not [o for e in events for o in e.outputs]
    _assert_idle(engine)

    # The thread survives: once the engine works again, requests run.
    monkeypatch.undo()
    events = _serve(engine, requests[:1])
    assert not _failures(events) and len(_tokens(events)["a"]) == GREEDY.max_tokens


@pytest.mark.parametrize("num_requests", [1, 5])
def test_a_step_failing_for_everyone_fails_each_request_once(
    engine, monkeypatch, num_requests
) -> None:
    requests = _requests(engine)[:num_requests]

    def broken(chunks, **kwargs):
        raise RuntimeError("injected: model")

    monkeypatch.setattr(engine.runner, "execute", broken)
    events = _serve(engine, requests)
    failures = _failures(events)
    assert sorted(rid for rid, _ in failures) == sorted(r.request_id for r in requests)
    assert {e.code for _, e in failures} == {"internal"}
    assert not _tokens(events)
    _assert_idle(engine)
