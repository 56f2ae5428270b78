"""Priority levels (ingest stage): the order in which a worker reads the request streams.

With several shards (worker/keys.py), each has one stream per level; ties between
shards' streams of the same level go to each shard in turn.

Each priority level has its own stream (`Keys.request_streams`). A worker reads the
highest level first and takes from a lower one only what the higher ones did not fill,
so a backlog of low-priority jobs never delays a high-priority one by more than a read.
Strict order alone would starve the low levels while high-priority work keeps coming, so
the levels age like the engine's queue: a stream's effective level is its level plus one
per `aging_s` seconds its oldest undelivered entry has waited (ties: the higher level).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis

from worker.keys import Keys

# How often the oldest undelivered entry of each stream is looked up (two round trips):
# aging works in tens of seconds, so a second-old view is fresh enough.
AGE_SAMPLE_S = 1.0


def read_order(
    streams: Sequence[tuple[str, int]] | Sequence[tuple[str, int, int]],
    ages_s: Mapping[str, float],
    aging_s: float,
    first_shard: int = 0,
    shards: int = 1,
) -> list[str]:
    """Stream names by effective level, highest first.

    Args:
        streams: (stream, level) or (stream, level, shard) triples.
        ages_s: age in seconds of each stream's oldest undelivered entry (missing: empty).
        aging_s: seconds of waiting that raise a level by one.
        first_shard: among streams of equal levels, this shard's comes first, then the
            next ones in turn (callers rotate it, so that every shard is read first as often).
    """

    def rank(item: tuple[Any, ...]) -> tuple[int, int, int]:
        stream, level = item[0], item[1]
        shard = item[2] if len(item) > 2 else 0
        turn = (shard - first_shard) % shards
        return (-(level + int(ages_s.get(stream, 0.0) // aging_s)), -level, turn)

    return [item[0] for item in sorted(streams, key=rank)]


class LevelReader:
    """Knows the read order of one namespace's request streams, refreshed every AGE_SAMPLE_S."""

    def __init__(self, client: aioredis.Redis, keys: Keys, aging_s: float) -> None:
        self._redis = client
        self._keys = keys
        self._aging_s = aging_s
        self._levels = keys.stream_levels
        self._ages: dict[str, float] = {}
        self._sampled = -AGE_SAMPLE_S
        self._turn = 0

    async def order(self) -> list[str]:
        """The streams in the order to read them now; each call starts ties at the next shard."""
        now = time.monotonic()
        if now - self._sampled >= AGE_SAMPLE_S:
            self._ages = await oldest_waiting_ages(self._redis, self._keys, time.time() * 1000)
            self._sampled = now
        shards = self._keys.shards
        self._turn = (self._turn + 1) % shards
        return read_order(self._levels, self._ages, self._aging_s, self._turn, shards)


async def oldest_waiting_ages(
    client: aioredis.Redis, keys: Keys, now_ms: float
) -> dict[str, float]:
    """Age in seconds of the oldest undelivered entry of each request stream that has one.

    The first entry after the group's last-delivered id is the oldest one nobody took yet
    (its id is its enqueue time in ms). A stream without the group counts as empty here.
    """
    streams = keys.request_streams
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.xinfo_groups(stream)
    groups = await pipe.execute(raise_on_error=False)
    starts = {}
    for stream, rows in zip(streams, groups, strict=True):
        row = _group_row(rows, keys.group)
        if row is not None:
            starts[stream] = "(" + _text(row["last-delivered-id"])
    pipe = client.pipeline(transaction=False)
    for stream, start in starts.items():
        pipe.xrange(stream, min=start, count=1)
    ages = {}
    for stream, first in zip(starts, await pipe.execute(), strict=True):
        if first:
            ages[stream] = max(0.0, now_ms - int(_text(first[0][0]).split("-", 1)[0])) / 1000
    return ages


def _group_row(rows: Any, group: str) -> dict[str, Any] | None:
    if isinstance(rows, Exception):
        return None  # no such stream yet
    for row in rows:
        if _text(row["name"]) == group:
            return row
    return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
