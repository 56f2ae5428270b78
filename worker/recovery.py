"""Recovery (ingest stage, redelivery side): keep live claims fresh, reclaim dead consumers' jobs.

A worker's pending entries are refreshed by `XCLAIM ... 0 JUSTID` every
heartbeat (resets their idle time without counting a delivery). Entries idle
longer than `claim_idle_ms` belong to a consumer that stopped heart-beating;
`XAUTOCLAIM` moves them to this worker, and their delivery counts (XPENDING)
decide between running them again and sending them to the dead-letter stream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import msgpack
import redis.asyncio as aioredis

from worker.errors import RequestError
from worker.keys import JOB_FIELD, Keys

log = logging.getLogger(__name__)

_XCLAIM_CHUNK = 1000
# XAUTOCLAIM scans at most 10 × COUNT pending entries per call; bound a full pass.
_MAX_SCAN_CALLS = 64


@dataclass(frozen=True)
class Entry:
    """One stream entry handed to this worker.

    payload: the `job` field (None when the entry has none).
    attempt: its delivery count, 1 for a first delivery.
    """

    entry_id: str
    payload: bytes | None
    attempt: int


def entry_from_fields(entry_id: bytes | str, fields: dict[Any, Any] | None, attempt: int) -> Entry:
    raw = fields or {}
    payload = raw.get(JOB_FIELD.encode(), raw.get(JOB_FIELD))
    return Entry(_text(entry_id), payload if isinstance(payload, bytes) else None, attempt)


class Recovery:
    """Claim refresh, reclaim and dead-lettering for one consumer of the requests group."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        consumer: str,
        *,
        claim_idle_ms: int,
        max_attempts: int,
        liveness_ttl_s: int,
    ) -> None:
        self._redis = client
        self._keys = keys
        self._consumer = consumer
        self._claim_idle_ms = claim_idle_ms
        self._max_attempts = max_attempts
        self._liveness_ttl_s = liveness_ttl_s
        self._cursor = "0-0"
        self.num_reclaimed = 0

    def exhausted(self, entry: Entry) -> bool:
        """True once the entry was delivered more than `max_attempts` times."""
        return entry.attempt > self._max_attempts

    async def heartbeat(self, entry_ids: list[str], stats: dict[str, Any]) -> None:
        """Reset the idle time of our in-flight entries; publish liveness and stats."""
        pipe = self._redis.pipeline(transaction=False)
        for start in range(0, len(entry_ids), _XCLAIM_CHUNK):
            chunk = entry_ids[start : start + _XCLAIM_CHUNK]
            pipe.xclaim(
                self._keys.requests, self._keys.group, self._consumer, 0, chunk, justid=True
            )
        pipe.hset(self._keys.workers, self._consumer, msgpack.packb(stats))
        pipe.set(self._keys.worker(self._consumer), 1, ex=self._liveness_ttl_s)
        await pipe.execute()

    async def release(self, entry_ids: list[str]) -> None:
        """Mark entries as long idle so other workers reclaim them at once (drain timeout)."""
        for start in range(0, len(entry_ids), _XCLAIM_CHUNK):
            await self._redis.xclaim(
                self._keys.requests,
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

    async def reclaim(self, count: int) -> list[Entry]:
        """Take up to `count` entries idle ≥ claim_idle_ms from any consumer, with delivery counts."""
        claimed: list[tuple[bytes, dict[Any, Any] | None]] = []
        for _ in range(_MAX_SCAN_CALLS):
            if len(claimed) >= count:
                break
            reply = await self._redis.xautoclaim(
                self._keys.requests,
                self._keys.group,
                self._consumer,
                self._claim_idle_ms,
                start_id=self._cursor,
                count=count - len(claimed),
            )
            self._cursor = _text(reply[0])
            claimed.extend((eid, fields) for eid, fields in reply[1] if eid is not None)
            if self._cursor == "0-0":
                break
        if not claimed:
            return []
        attempts = await self._delivery_counts([_text(eid) for eid, _ in claimed])
        # No pending row any more: its old owner acked it meanwhile, so it is done.
        entries = [
            entry_from_fields(eid, fields, attempts[_text(eid)])
            for eid, fields in claimed
            if _text(eid) in attempts
        ]
        self.num_reclaimed += len(entries)
        log.info("reclaimed %d idle entries", len(entries))
        return entries

    async def _delivery_counts(self, entry_ids: list[str]) -> dict[str, int]:
        pipe = self._redis.pipeline(transaction=False)
        for entry_id in entry_ids:
            pipe.xpending_range(self._keys.requests, self._keys.group, entry_id, entry_id, 1)
        counts: dict[str, int] = {}
        for rows in await pipe.execute():
            for row in rows:
                counts[_text(row["message_id"])] = int(row["times_delivered"])
        return counts

    def dead_letter_fields(self, entry: Entry, error: RequestError) -> dict[str, Any]:
        """Fields of the dead-letter entry: the job as received plus why it died."""
        return {
            JOB_FIELD: entry.payload or b"",
            "entry_id": entry.entry_id,
            "attempts": entry.attempt,
            "code": error.code,
            "message": error.message,
            "worker": self._consumer,
        }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
