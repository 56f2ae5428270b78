"""A request that makes the engine step raise fails alone; the rest of the batch is unchanged."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable

import pytest
from transformers import AutoTokenizer

from tests.prompts_data import PROMPTS
from worker.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from worker.engine import isolation
from worker.engine.engine import Engine
from worker.engine.sequence import Request, Sequence, TokenOutput
from worker.params import SamplingParams

MAX_NEW = 10
FAIL_AT = 3  # the bad request raises once it has this many tokens: mid-batch, mid-decode
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
# Mixed lengths (161 tokens down to 7) under a 64-token budget: chunked prefills run
# beside decodes in the steps that fail.
GOOD_PROMPTS = [PROMPTS[i] for i in (6, 2, 10, 1, 3, 9)]
BAD_PROMPT = PROMPTS[4]


# -- bisect on its own ------------------------------------------------------------------------


def _bisect(items: list[int], bad: Callable[[list[int]], bool], limit: int = 100):
    """Runs bisect with an attempt that raises when `bad(group)`; returns (blamed, committed, runs)."""
    committed: list[int] = []
    runs: list[list[int]] = []

    def attempt(group: list[int]) -> list[int]:
        runs.append(list(group))
        if bad(list(group)):
            raise RuntimeError(f"group {group}")
        return list(group)

    blamed = isolation.bisect(
        items, RuntimeError("all"), attempt, lambda g, r: committed.extend(r), limit
    )
    return [item for item, _ in blamed], committed, runs


def test_bisect_blames_only_the_culprits_and_commits_every_other_item_once() -> None:
    items = list(range(13))
    for culprits in ({0}, {7}, {12}, {3, 9}, {4, 5}):
        blamed, committed, runs = _bisect(items, lambda g, c=culprits: bool(c & set(g)))
        assert blamed == sorted(culprits)
        assert sorted(committed) == sorted(set(items) - culprits)
        assert len(runs) <= isolation.max_runs(len(items))


def test_bisect_blames_each_item_with_its_own_exception() -> None:
    def attempt(group):
        if 2 in group:
            raise KeyError(2)
        if 5 in group:
            raise ValueError(5)

    blamed = isolation.bisect(list(range(8)), RuntimeError(), attempt, lambda g, r: None, 100)
    assert [(item, type(exc)) for item, exc in blamed] == [(2, KeyError), (5, ValueError)]


def test_bisect_is_bounded_when_everything_fails() -> None:
    items = list(range(64))
    limit = isolation.max_runs(len(items))
    blamed, committed, runs = _bisect(items, lambda g: True, limit)
    assert blamed == items  # each once, in order
    assert committed == []
    assert len(runs) == limit < 2 * len(items) - 2  # full bisection would take 126 runs


def test_bisect_of_one_item_blames_it_without_a_retry() -> None:
    blamed, committed, runs = _bisect([7], lambda g: True)
    assert (blamed, committed, runs) == ([7], [], [])


def test_bisect_lets_commit_errors_through() -> None:
    def commit(group, result):
        raise OSError("commit")

    with pytest.raises(OSError):
        isolation.bisect([1, 2], RuntimeError(), lambda g: None, commit, 10)


# -- through the engine ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return Engine(
        EngineConfig(
            model=ModelConfig(source=str(tiny_model_dir("qwen3")), dtype="float32"),
            cache=CacheConfig(block_size=16, num_blocks=128),
            scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8),
            num_threads=1,  # tiny matrices: more threads only contend
        )
    )


@pytest.fixture(scope="module")
def requests(engine: Engine) -> list[Request]:
    tokenizer = AutoTokenizer.from_pretrained(engine.config.model.source)
    prompts = [*GOOD_PROMPTS[:3], BAD_PROMPT, *GOOD_PROMPTS[3:]]
    ids = ["g0", "g1", "g2", "bad", "g3", "g4", "g5"]
    return [
        Request(i, tuple(tokenizer.encode(p)), GREEDY) for i, p in zip(ids, prompts, strict=True)
    ]


@pytest.fixture(scope="module")
def baseline(engine: Engine, requests: list[Request]) -> dict[str, list[int]]:
    """Tokens of the good requests run without the bad one."""
    outputs = _run(engine, [r for r in requests if r.request_id != "bad"])
    return {rid: _tokens(outs) for rid, outs in outputs.items()}


def _run(engine: Engine, requests: list[Request]) -> dict[str, list[TokenOutput]]:
    """Drive the step API to completion; every output of every request, in order."""
    for request in requests:
        engine.add_request(request)
    outputs: dict[str, list[TokenOutput]] = defaultdict(list)
    for _ in range(500):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            outputs[out.request_id].append(out)
    assert not engine.has_unfinished_requests()
    for rid, outs in outputs.items():
        # One final output each, and nothing after it.
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True], rid
    return outputs


def _tokens(outs: list[TokenOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def _is_bad(seq: Sequence) -> bool:
    return seq.request_id == "bad" and seq.num_output_tokens >= FAIL_AT


def _fail_forward(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    execute = engine.runner.execute

    def failing(chunks, **kwargs):
        if any(_is_bad(c.seq) for c in chunks):
            raise RuntimeError("injected: forward pass")
        return execute(chunks, **kwargs)

    monkeypatch.setattr(engine.runner, "execute", failing)


def _fail_sampler(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    sampler = engine.sampler

    def failing(logits, seqs, eos_token_ids):
        if any(_is_bad(s) for s in seqs):
            raise RuntimeError("injected: sampling")
        return sampler(logits, seqs, eos_token_ids)

    monkeypatch.setattr(engine, "sampler", failing)


def _fail_stop_check(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    stop_reason = engine._stop_reason

    def failing(seq, token):
        if _is_bad(seq):
            raise RuntimeError("injected: stop handling")
        return stop_reason(seq, token)

    monkeypatch.setattr(engine, "_stop_reason", failing)


def _assert_idle(engine: Engine) -> None:
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.num_free_blocks == stats.num_total_blocks  # every page came back


@pytest.mark.parametrize(
    ("inject", "tokens_before"),
    [(_fail_forward, FAIL_AT), (_fail_sampler, FAIL_AT), (_fail_stop_check, FAIL_AT - 1)],
    ids=["forward", "sampler", "stop"],
)
def test_failing_request_fails_alone_and_the_rest_is_unchanged(
    engine, requests, baseline, monkeypatch, inject, tokens_before
) -> None:
    inject(engine, monkeypatch)
    outputs = _run(engine, requests)
    bad = outputs.pop("bad")
    final = bad[-1]
    assert final.finish_reason == "error" and final.error is not None
    assert final.error.code == "internal"
    # The exception type, not its message or traceback.
    assert final.error.message == "the engine failed on this request (RuntimeError)"
    assert len(_tokens(bad)) == tokens_before  # failed mid-decode, beside the others
    assert all(
        o.error is None and o.finish_reason == "length" for o in (v[-1] for v in outputs.values())
    )
    assert {rid: _tokens(outs) for rid, outs in outputs.items()} == baseline
    assert all(len(t) == MAX_NEW for t in baseline.values())
    _assert_idle(engine)


def test_params_that_break_the_sampler_fail_only_their_request(engine, requests, baseline) -> None:
    # A stop id past int64 once overflowed the sampler's min_tokens mask and failed the whole
    # step; validation now refuses it, so smuggle it in after add_request.
    bad_params = dataclasses.replace(GREEDY, min_tokens=2)
    runs = [
        dataclasses.replace(r, params=bad_params) if r.request_id == "bad" else r for r in requests
    ]
    for request in runs:
        engine.add_request(request)
    object.__setattr__(bad_params, "stop_token_ids", (2**64 - 1,))
    outputs = _run(engine, [])
    bad = outputs.pop("bad")
    assert [(o.finish_reason, o.error.code) for o in bad] == [("error", "internal")]
    assert bad[0].error.message == "the engine failed on this request (ValueError)"
    assert {rid: _tokens(outs) for rid, outs in outputs.items()} == baseline
    _assert_idle(engine)


def test_step_failing_for_everyone_fails_each_request_once(
    engine, requests, baseline, monkeypatch
) -> None:
    calls = 0

    def broken(chunks, **kwargs):
        nonlocal calls
        calls += 1
        raise RuntimeError("injected: the model is broken")

    monkeypatch.setattr(engine.runner, "execute", broken)
    for request in requests:
        engine.add_request(request)
    failed: list[str] = []
    while engine.has_unfinished_requests():
        before = calls
        errors = [o for o in engine.step() if o.finished]
        assert all(o.error is not None and o.error.code == "internal" for o in errors)
        # One attempt, then at most max_runs retries for the step's batch.
        assert calls - before <= 1 + isolation.max_runs(len(errors))
        failed += [o.request_id for o in errors]
    assert sorted(failed) == sorted(r.request_id for r in requests)
    _assert_idle(engine)

    # The engine is not left broken: once the model runs again, so do requests.
    monkeypatch.undo()
    completions = engine.generate([r for r in requests if r.request_id != "bad"])
    assert {c.request_id: list(c.token_ids) for c in completions} == baseline


def test_generate_reports_an_engine_failure_as_an_error_completion(
    engine, requests, baseline, monkeypatch
) -> None:
    _fail_sampler(engine, monkeypatch)
    completions = {c.request_id: c for c in engine.generate(requests)}
    bad = completions.pop("bad")
    assert bad.finish_reason == "error"
    assert bad.error == {
        "code": "internal",
        "message": "the engine failed on this request (RuntimeError)",
    }
    assert {rid: list(c.token_ids) for rid, c in completions.items()} == baseline
    assert all(c.error is None for c in completions.values())
