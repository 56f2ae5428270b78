"""Read stage: the Redis side of intake — XREADGROUP with backpressure, screening, cancels.

Reads only as many entries as the caller has room for, so un-started jobs held
in memory stay bounded, from the priority levels' streams in their read order
(worker/service/levels.py): a lower level gets only the room the higher ones left.
What becomes of an entry read here (decode, tokenize, start or refuse) is
`worker.service.intake`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Sequence

import redis.asyncio as aioredis
import redis.exceptions

from worker.config import SchedulerConfig
from worker.keys import Keys
from worker.protocol import Job
from worker.service.levels import LevelReader
from worker.service.recovery import Entry, entry_from_fields
from worker.service.resilience import TRANSIENT, Backoff

log = logging.getLogger(__name__)

_POLL_S = 0.5

# Screening verdicts for a decoded job, before it costs any tokenization.
RUN = "run"
ALREADY_DONE = "done"
CANCELLED = "cancelled"


class StreamReader:
    """Reads entries, screens jobs and listens for cancels, for one consumer of the requests group."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        consumer: str,
        *,
        priority_aging_s: float = SchedulerConfig.priority_aging_s,
    ) -> None:
        self._redis = client
        self._keys = keys
        self._consumer = consumer
        self._levels = LevelReader(client, keys, priority_aging_s)
        self._blocked: dict[int, asyncio.Future[list[Entry]]] = {}  # shard → blocking read
        self._spill: list[Entry] = []  # read, not handed out yet (a sibling read failed)
        self.num_read = 0

    async def ensure_group(self) -> None:
        """Create the consumer group (and the stream) of each priority level unless it exists."""
        for stream in self._keys.request_streams:
            try:
                await self._redis.xgroup_create(stream, self._keys.group, id="0", mkstream=True)
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def read(self, count: int, block_ms: int | None) -> list[Entry]:
        """Up to `count` never-delivered entries, waiting at most `block_ms` for the first.

        Streams are read one by one in their read order, each for the room still left;
        only when all are empty does one blocking read wait on all of them (one entry
        each: in a race with several producers the room can be overrun by a level or two;
        with several shards, one blocking read per shard, overrun by a shard or two).
        A missing group (NOGROUP) raises: the caller re-creates it (worker/resilience.py).
        """
        if count <= 0:
            return []
        entries = self.take_ready()
        for stream in await self._levels.order():
            if len(entries) >= count:
                break
            entries += await self._read({stream: ">"}, count - len(entries), None)
        if not entries and block_ms is not None:
            entries = await self._block(await self._levels.order(), block_ms)
        self.num_read += len(entries)
        return entries

    async def _block(self, order: list[str], block_ms: int) -> list[Entry]:
        """One blocking read per shard (XREADGROUP cannot span cluster slots); returns as soon
        as one has entries. NOTE: the others stay in flight, never cancelled (a cancelled
        read can lose what it delivered); `take_ready` collects them later."""
        by_shard: dict[int, dict[str, str]] = {}
        for stream in order:
            by_shard.setdefault(self._keys.shard_of_key(stream) or 0, {})[stream] = ">"
        if len(by_shard) == 1:
            return await self._read(next(iter(by_shard.values())), 1, block_ms)
        for shard, streams in by_shard.items():
            if shard not in self._blocked:
                self._blocked[shard] = asyncio.ensure_future(self._read(streams, 1, block_ms))
        entries: list[Entry] = []
        while not entries and self._blocked:  # [] only once every shard's read came back empty
            await asyncio.wait(self._blocked.values(), return_when=asyncio.FIRST_COMPLETED)
            entries = self.take_ready()
        return entries

    def take_ready(self) -> list[Entry]:
        """Entries of blocking reads that completed since the last call (raises a failed
        read's error once, after collecting the others)."""
        entries: list[Entry] = []
        error: BaseException | None = None
        for shard, task in list(self._blocked.items()):
            if task.done():
                del self._blocked[shard]
                if task.exception() is not None:
                    error = task.exception()
                else:
                    entries += task.result()
        if error is not None:
            self._spill = entries
            raise error
        entries, self._spill = self._spill + entries, []
        return entries

    async def settle(self) -> list[Entry]:
        """Wait for every blocking read in flight and take what they read (before an
        adoption, which must not mistake their entries for orphans)."""
        if self._blocked:
            await asyncio.wait(self._blocked.values())
        return self.take_ready()

    def close(self) -> None:
        """Cancel the blocking reads in flight (shutdown: what they delivered stays pending)."""
        for task in self._blocked.values():
            task.cancel()
        self._blocked.clear()

    async def _read(self, streams: dict[str, str], count: int, block_ms: int | None) -> list[Entry]:
        reply = await self._redis.xreadgroup(
            self._keys.group, self._consumer, streams, count=count, block=block_ms
        )
        return [
            entry_from_fields(_text(stream), entry_id, fields, attempt=1)
            for stream, messages in reply or ()
            for entry_id, fields in messages
            if entry_id is not None
        ]

    async def screen(self, jobs: Sequence[Job]) -> list[str]:
        """RUN, ALREADY_DONE (its final result exists) or CANCELLED, per job; one round trip."""
        if not jobs:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for job in jobs:
            pipe.exists(self._keys.result(job.id))
            pipe.exists(self._keys.cancelled(job.id))
        flags = await pipe.execute()
        verdicts = []
        for i in range(len(jobs)):
            done, cancelled = flags[2 * i], flags[2 * i + 1]
            verdicts.append(ALREADY_DONE if done else CANCELLED if cancelled else RUN)
        return verdicts

    async def listen_cancels(
        self,
        on_cancel: Callable[[str], None],
        subscribed: asyncio.Event,
        closing: asyncio.Event,
        held: Callable[[], Collection[str]],
    ) -> None:
        """Call `on_cancel(job_id)` for each message on the cancel channel until `closing`.

        held: the ids of the jobs the worker holds. After each (re)subscription their
        cancel keys are checked, so a cancel sent while the subscription was down is not
        lost for a running job either.
        """
        backoff = Backoff()
        while not closing.is_set():
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._keys.cancel_channel)
                for job_id in await self._cancelled(list(held())):
                    on_cancel(job_id)
                subscribed.set()
                backoff.reset()
                while not closing.is_set():
                    message = await pubsub.get_message(timeout=_POLL_S)
                    if message is not None and message.get("type") == "message":
                        on_cancel(message["data"].decode(errors="replace"))
            except TRANSIENT as exc:
                log.warning("cancel subscription lost (%r); resubscribing", exc)
                await backoff.sleep(closing)
            finally:
                with contextlib.suppress(*TRANSIENT):
                    await pubsub.aclose()

    async def _cancelled(self, job_ids: list[str]) -> list[str]:
        if not job_ids:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.exists(self._keys.cancelled(job_id))
        return [job_id for job_id, hit in zip(job_ids, await pipe.execute(), strict=True) if hit]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
