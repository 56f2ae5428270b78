"""Recovery (ingest stage, redelivery side): keep live claims fresh, reclaim dead consumers' jobs.

A worker's pending entries are refreshed by `XCLAIM ... 0 JUSTID` every
heartbeat (resets their idle time without counting a delivery). Entries idle
longer than `claim_idle_ms` belong to a consumer that stopped heart-beating;
`XAUTOCLAIM` moves them to this worker, and their delivery counts (XPENDING)
decide between running them again and sending them to the dead-letter stream.
Entries pending under this consumer that the service does not hold (a reply lost
with its connection) are adopted as they are, without a delivery counted.

All of this runs on every priority level's request stream (`Keys.request_streams`), the
highest first; an entry is named by its stream and id (`EntryRef`), since two streams
can hold the same id.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import msgpack
import redis.asyncio as aioredis

from worker.errors import RequestError
from worker.keys import JOB_FIELD, EntryRef, Keys

log = logging.getLogger(__name__)

_XCLAIM_CHUNK = 1000
# XAUTOCLAIM scans at most 10 × COUNT pending entries per call; bound a full pass.
_MAX_SCAN_CALLS = 64
# Our own pending entries read per adoption pass: the in-flight limit plus a few orphans.
_ADOPT_SCAN = 10_000
# Bytes of a job payload kept in its dead-letter entry (protocol: `job`, with `job_size` and
# `job_truncated`): enough to identify a job, while a stream of oversized payloads stays small.
DEAD_LETTER_JOB_BYTES = 4096


@dataclass(frozen=True)
class Entry:
    """One stream entry handed to this worker.

    stream: the request stream it is in (one per priority level).
    payload: the `job` field (None when the entry has none).
    attempt: its delivery count, 1 for a first delivery (0: unknown, Redis dropped it).
    deleted: claimed, but no longer in the stream (XDEL, trimming): nothing to run.
    """

    stream: str
    entry_id: str
    payload: bytes | None
    attempt: int
    deleted: bool = False

    @property
    def ref(self) -> EntryRef:
        return (self.stream, self.entry_id)


def entry_from_fields(
    stream: str, entry_id: bytes | str, fields: dict[Any, Any] | None, attempt: int
) -> Entry:
    raw = fields or {}
    payload = raw.get(JOB_FIELD.encode(), raw.get(JOB_FIELD))
    return Entry(stream, _text(entry_id), payload if isinstance(payload, bytes) else None, attempt)


class Recovery:
    """Claim refresh, reclaim, adoption and dead-lettering for one consumer of the requests group.

    held: the entries the service holds now (in flight or being refused).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        consumer: str,
        *,
        claim_idle_ms: int,
        max_attempts: int,
        liveness_ttl_s: int,
        held: Callable[[], Collection[EntryRef]],
    ) -> None:
        self._redis = client
        self._keys = keys
        self._consumer = consumer
        self._claim_idle_ms = claim_idle_ms
        self._max_attempts = max_attempts
        self._liveness_ttl_s = liveness_ttl_s
        self._held = held
        self._cursors = dict.fromkeys(keys.request_streams, "0-0")
        # Claimed by XAUTOCLAIM but not handed out yet: kept across a failed call, so a
        # dropped connection never loses a claim (the retry finishes the same round).
        self._claimed: list[tuple[str, bytes, dict[Any, Any] | None]] = []
        self._deleted: list[EntryRef] = []
        self._inherited: set[EntryRef] = set()
        self.adoption_due = False
        self.num_reclaimed = 0
        self.num_adopted = 0

    def exhausted(self, entry: Entry) -> bool:
        """True once the entry was delivered more than `max_attempts` times."""
        return entry.attempt > self._max_attempts

    async def heartbeat(self, entries: Iterable[EntryRef], stats: dict[str, Any]) -> None:
        """Reset the idle time of our in-flight entries; publish liveness and stats."""
        pipe = self._redis.pipeline(transaction=False)
        for stream, entry_ids in _by_stream(entries).items():
            for start in range(0, len(entry_ids), _XCLAIM_CHUNK):
                chunk = entry_ids[start : start + _XCLAIM_CHUNK]
                pipe.xclaim(stream, self._keys.group, self._consumer, 0, chunk, justid=True)
        pipe.hset(self._keys.workers, self._consumer, msgpack.packb(stats))
        pipe.set(self._keys.worker(self._consumer), 1, ex=self._liveness_ttl_s)
        await pipe.execute()

    async def release(self, entries: Iterable[EntryRef]) -> None:
        """Mark entries as long idle so other workers reclaim them at once (drain timeout)."""
        for stream, entry_ids in _by_stream(entries).items():
            for start in range(0, len(entry_ids), _XCLAIM_CHUNK):
                await self._redis.xclaim(
                    stream,
                    self._keys.group,
                    self._consumer,
                    0,
                    entry_ids[start : start + _XCLAIM_CHUNK],
                    idle=self._claim_idle_ms,
                    justid=True,
                )

    async def leave(self) -> None:
        """Forget this worker's liveness and stats (clean exit)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hdel(self._keys.workers, self._consumer)
        pipe.delete(self._keys.worker(self._consumer))
        await pipe.execute()

    async def inherit(self) -> None:
        """Note what an earlier process of this consumer name left pending (call at start).

        Those entries are reclaimed once idle, which counts a delivery (a job that crashes
        workers must reach max_attempts); `adopt()` takes them only once deleted.
        """
        self._inherited = {ref for ref, _ in await self._own_pending()}

    async def reclaim(self, count: int) -> list[Entry]:
        """Take up to `count` entries idle ≥ claim_idle_ms from any consumer, with delivery counts.

        Entries deleted from the stream come back `deleted`: Redis 7 names them (and drops
        them from the PEL); Redis 6.2 returns a nil in their place and leaves them pending
        under this consumer, where the next `adopt()` finds them.
        """
        for stream in self._keys.request_streams:  # the highest level first
            await self._reclaim_stream(stream, count)
        if not self._claimed and not self._deleted:
            return []
        attempts = await self._delivery_counts([(st, _text(eid)) for st, eid, _ in self._claimed])
        # No pending row any more: its old owner acked it meanwhile, so it is done.
        entries = [
            entry_from_fields(st, eid, fields, attempts[(st, _text(eid))])
            for st, eid, fields in self._claimed
            if (st, _text(eid)) in attempts
        ]
        entries += [Entry(st, eid, None, 0, deleted=True) for st, eid in self._deleted]
        self._inherited.difference_update(e.ref for e in entries)  # ours now
        self._claimed, self._deleted = [], []
        self.num_reclaimed += len(entries)
        log.info("reclaimed %d idle entries", len(entries))
        return entries

    async def _reclaim_stream(self, stream: str, count: int) -> None:
        """Add `stream`'s idle entries to the claimed ones, up to `count` in all."""
        for _ in range(_MAX_SCAN_CALLS):
            if len(self._claimed) + len(self._deleted) >= count:
                break
            reply = await self._redis.xautoclaim(
                stream,
                self._keys.group,
                self._consumer,
                self._claim_idle_ms,
                start_id=self._cursors[stream],
                count=count - len(self._claimed) - len(self._deleted),
            )
            self._cursors[stream] = _text(reply[0])
            for eid, fields in reply[1]:
                if eid is None:
                    self.adoption_due = True
                else:
                    self._claimed.append((stream, eid, fields))
            self._deleted += [(stream, _text(eid)) for eid in (reply[2] if len(reply) > 2 else ())]
            if self._cursors[stream] == "0-0":
                break

    async def adopt(self) -> list[Entry]:
        """Entries pending under this consumer that nobody here holds, taken as they are.

        A reply lost with its connection (XREADGROUP or XAUTOCLAIM ran, the answer never
        came) leaves such entries; left alone they would go idle and be reclaimed with one
        delivery too many. Their delivery counts stay as they are.
        """
        known = set(self._held())
        known.update((stream, _text(eid)) for stream, eid, _ in self._claimed)
        orphans = [(ref, n) for ref, n in await self._own_pending() if ref not in known]
        entries = await self._fetch(orphans) if orphans else []
        # An inherited entry deleted from the stream has nothing left to run: take it (Redis
        # 6.2 would keep it pending forever); the others stay for a reclaim.
        entries = [e for e in entries if e.deleted or e.ref not in self._inherited]
        self.adoption_due = False
        if entries:
            self.num_adopted += len(entries)
            log.warning("adopted %d entries pending under this consumer", len(entries))
        return entries

    async def _own_pending(self) -> list[tuple[EntryRef, int]]:
        """(entry, delivery count) of the entries pending under this consumer, every stream."""
        pipe = self._redis.pipeline(transaction=False)
        streams = self._keys.request_streams
        for stream in streams:
            pipe.xpending_range(
                stream, self._keys.group, "-", "+", _ADOPT_SCAN, consumername=self._consumer
            )
        return [
            ((stream, _text(row["message_id"])), int(row["times_delivered"]))
            for stream, rows in zip(streams, await pipe.execute(), strict=True)
            for row in rows
        ]

    async def _fetch(self, rows: list[tuple[EntryRef, int]]) -> list[Entry]:
        pipe = self._redis.pipeline(transaction=False)
        for (stream, entry_id), _ in rows:
            pipe.xrange(stream, entry_id, entry_id, count=1)
        entries = []
        for ((stream, entry_id), attempt), found in zip(rows, await pipe.execute(), strict=True):
            if found:
                entries.append(entry_from_fields(stream, entry_id, found[0][1], attempt))
            else:
                entries.append(Entry(stream, entry_id, None, attempt, deleted=True))
        return entries

    async def _delivery_counts(self, refs: list[EntryRef]) -> dict[EntryRef, int]:
        pipe = self._redis.pipeline(transaction=False)
        for stream, entry_id in refs:
            pipe.xpending_range(stream, self._keys.group, entry_id, entry_id, 1)
        counts: dict[EntryRef, int] = {}
        for (stream, _), rows in zip(refs, await pipe.execute(), strict=True):
            for row in rows:
                counts[(stream, _text(row["message_id"]))] = int(row["times_delivered"])
        return counts

    def dead_letter_fields(self, entry: Entry, error: RequestError) -> dict[str, Any]:
        """Fields of the dead-letter entry: the job as received (its first
        DEAD_LETTER_JOB_BYTES bytes) plus why it died."""
        payload = entry.payload or b""
        return {
            JOB_FIELD: payload[:DEAD_LETTER_JOB_BYTES],
            "job_size": len(payload),
            "job_truncated": int(len(payload) > DEAD_LETTER_JOB_BYTES),
            "entry_id": entry.entry_id,
            "stream": entry.stream,
            "attempts": entry.attempt,
            "code": error.code,
            "message": error.message,
            "worker": self._consumer,
        }


def _by_stream(entries: Iterable[EntryRef]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = defaultdict(list)
    for stream, entry_id in entries:
        grouped[stream].append(entry_id)
    return grouped


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
