"""Retrier, Backoff and Supervisor on their own: outages are retried, bugs are not, deaths are loud."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest
import redis.exceptions

from worker.service.resilience import Backoff, Interrupted, Retrier, Supervisor

NOGROUP = redis.exceptions.ResponseError("NOGROUP No such key 'q' or consumer group 'g'")


def flaky(*failures: BaseException, result: str = "ok"):
    """An async callable that raises each of `failures` in turn, then returns `result`."""
    calls: list[int] = []

    async def call() -> str:
        calls.append(1)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return result

    call.calls = calls  # type: ignore[attr-defined]
    return call


def test_backoff_is_jittered_exponential_and_capped():
    random.seed(12)
    policy = Backoff(base_s=0.1, cap_s=1.0)._policy
    delays = [[policy.compute(n) for n in range(1, 9)] for _ in range(200)]
    for n, column in enumerate(zip(*delays, strict=True), start=1):
        ceiling = min(1.0, 0.1 * 2**n)
        assert all(ceiling / 2 <= d <= ceiling for d in column)
        assert len(set(column)) == 200  # jittered, at the cap too: retries do not line up


def test_transient_errors_are_retried_until_the_call_succeeds(caplog):
    errors = [redis.exceptions.ConnectionError("reset"), redis.exceptions.TimeoutError("slow")]
    fn = flaky(*errors, OSError("unreachable"))
    seen: list[BaseException] = []
    retrier = Retrier(base_s=0.001, cap_s=0.002)
    with caplog.at_level(logging.DEBUG, logger="worker.service.resilience"):
        assert asyncio.run(retrier.call("reading", fn, on_error=seen.append)) == "ok"
    assert len(fn.calls) == 4 and [type(e) for e in seen[:2]] == [type(e) for e in errors]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # the first failure of an outage; the rest go to debug
    assert any("recovered after 3 failures" in r.getMessage() for r in caplog.records)


def test_nogroup_recreates_the_group_and_retries():
    created: list[int] = []

    async def ensure_group() -> None:
        created.append(1)

    fn = flaky(NOGROUP)
    assert asyncio.run(Retrier(ensure_group, base_s=0.001).call("claiming", fn)) == "ok"
    assert created == [1] and len(fn.calls) == 2
    # Without a way to re-create it, NOGROUP is an error like any other.
    with pytest.raises(redis.exceptions.ResponseError, match="NOGROUP"):
        asyncio.run(Retrier().call("claiming", flaky(NOGROUP)))


def test_other_errors_propagate_at_once():
    fn = flaky(redis.exceptions.ResponseError("WRONGTYPE"), ValueError("bug"))
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        asyncio.run(Retrier(base_s=0.001).call("reading", fn))
    assert len(fn.calls) == 1


def test_a_stop_interrupts_the_retries():
    async def scenario() -> int:
        stop = asyncio.Event()
        calls = 0

        async def down() -> None:
            nonlocal calls
            calls += 1
            if calls == 3:
                stop.set()
            raise redis.exceptions.ConnectionError("refused")

        with pytest.raises(Interrupted):
            await Retrier(base_s=0.001, cap_s=0.002).call("reading", down, stop=stop)
        return calls

    assert asyncio.run(scenario()) == 3


def test_supervisor_reports_tasks_that_die_and_only_those(caplog):
    async def scenario() -> list[str]:
        deaths: list[str] = []
        supervisor = Supervisor(deaths.append)
        release = asyncio.Event()

        async def crash() -> None:
            raise RuntimeError("boom")

        async def quits() -> None:
            return

        async def waits() -> None:
            await release.wait()

        supervisor.spawn("crasher", crash(), loop=True)
        supervisor.spawn("quitter", quits(), loop=True)
        supervisor.spawn("one-shot", quits(), loop=False)  # done is done: not a death
        supervisor.spawn("waiter", waits(), loop=True)
        supervisor.spawn("ends at close", waits(), loop=True)
        await asyncio.sleep(0.01)
        supervisor.closing = True
        release.set()  # loops that end once the service closes are not deaths either
        await asyncio.sleep(0.01)
        supervisor.spawn("cancelled", asyncio.sleep(10), loop=True)
        await supervisor.stop(1.0)
        assert supervisor.tasks == []
        return deaths

    with caplog.at_level(logging.ERROR, logger="worker.service.resilience"):
        assert sorted(asyncio.run(scenario())) == ["crasher", "quitter"]
    crash_log = next(r for r in caplog.records if "crasher" in r.getMessage())
    assert crash_log.exc_info is not None and "boom" in str(crash_log.exc_info[1])
