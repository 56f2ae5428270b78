"""Priority levels: the read order of the request streams (pure rule, then against Redis)."""

from __future__ import annotations

import asyncio
import time

from tests.worker_harness import KEYS, job, push
from worker.keys import PRIORITY_LEVELS
from worker.redis_url import connect_async
from worker.service.intake import decode_entry
from worker.service.levels import oldest_waiting_ages, read_order
from worker.service.reader import StreamReader

HIGH, DEFAULT, LOW = KEYS.request_streams
LEVELS = list(zip(KEYS.request_streams, PRIORITY_LEVELS, strict=True))


def test_streams_are_read_highest_level_first_when_nothing_has_aged() -> None:
    assert read_order(LEVELS, {}, aging_s=60) == [HIGH, DEFAULT, LOW]
    assert read_order(LEVELS, dict.fromkeys([HIGH, DEFAULT, LOW], 59.0), 60) == [HIGH, DEFAULT, LOW]


def test_a_lower_level_rises_one_level_per_aging_period_of_its_oldest_entry() -> None:
    # Low waited one period: it ties with default (the higher level wins the tie).
    assert read_order(LEVELS, {LOW: 60.0}, 60) == [HIGH, DEFAULT, LOW]
    # Two periods: it ties with high and passes default.
    assert read_order(LEVELS, {LOW: 120.0}, 60) == [HIGH, LOW, DEFAULT]
    # Three: it is read first, whatever high holds that is fresher.
    assert read_order(LEVELS, {LOW: 180.0, HIGH: 1.0}, 60) == [LOW, HIGH, DEFAULT]


def _reader(aclient, aging_s: float = 60.0) -> StreamReader:
    return StreamReader(aclient, KEYS, "c", priority_aging_s=aging_s)


def test_a_read_fills_from_higher_levels_first_and_lower_levels_get_the_rest(redis_url, client):
    push(client, [job(f"d{i}") for i in range(3)])
    push(client, [job(f"l{i}", priority=-1) for i in range(3)], stream=LOW)
    push(client, [job("h0", priority=1)], stream=HIGH)

    async def scenario() -> list[list[str]]:
        aclient = connect_async(redis_url)
        reader = _reader(aclient)
        try:
            await reader.ensure_group()
            first = await reader.read(3, None)
            rest = await reader.read(10, 10)
            return [[decode_entry(e, KEYS, 9999).id for e in batch] for batch in (first, rest)]
        finally:
            await aclient.aclose()

    first, rest = asyncio.run(scenario())
    assert first == ["h0", "d0", "d1"]
    assert rest == ["d2", "l0", "l1", "l2"]


def test_an_old_low_priority_backlog_is_read_before_fresh_high_priority_jobs(redis_url, client):
    """Aging on the read side: a low entry enqueued 3 aging periods ago outranks fresh high ones."""
    aging_s = 10.0
    old_ms = int(time.time() * 1000 - 3.5 * aging_s * 1000)
    client.xadd(LOW, {"job": b""}, id=f"{old_ms}-0")  # an entry enqueued 35 s ago
    push(client, [job("h0", priority=1)], stream=HIGH)

    async def scenario() -> tuple[dict[str, float], list[str]]:
        aclient = connect_async(redis_url)
        reader = _reader(aclient, aging_s)
        try:
            await reader.ensure_group()
            ages = await oldest_waiting_ages(aclient, KEYS, time.time() * 1000)
            return ages, [e.stream for e in await reader.read(1, None)]
        finally:
            await aclient.aclose()

    ages, streams = asyncio.run(scenario())
    assert ages[LOW] >= 3 * aging_s and ages[HIGH] < aging_s and DEFAULT not in ages
    assert streams == [LOW]
