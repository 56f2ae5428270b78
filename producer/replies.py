"""ReplyRouter: the one reader of a client's reply streams, demultiplexing results by job id.

Final results go to waiting futures, else into a bounded buffer; `partial`
deltas go to per-id queues registered for stream jobs. Consumed entries are
trimmed so the streams stay small; their TTL is refreshed while the router runs.
A client has one reply stream per shard (worker/keys.py), each read by a task of its own
(one XREAD cannot span cluster slots).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.tasks import cancel_and_wait
from worker.keys import RESULT_FIELD
from worker.protocol import Result, decode_result

log = logging.getLogger(__name__)

_READ_COUNT = 512
_CLOSED = None  # queue sentinel: the router stopped


class ClientClosedError(RuntimeError):
    """The router (its client) was closed while a caller waited on it."""


class ReplyRouter:
    """Reads each of `streams` with XREAD BLOCK in a task; hands results to whoever waits."""

    def __init__(
        self,
        redis: aioredis.Redis,
        streams: Sequence[str],
        *,
        ttl_s: int,
        max_buffered: int,
        block_ms: int,
        on_read_failure: Callable[[], None] | None = None,
    ) -> None:
        self._redis = redis
        self._streams = tuple(streams)
        self._ttl_s = ttl_s
        self._max_buffered = max_buffered
        self._block_ms = block_ms
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._outstanding: set[str] = set()
        self._finals: OrderedDict[str, Result] = OrderedDict()
        self._waiters: dict[str, list[asyncio.Future[Result]]] = {}
        self._queues: dict[str, asyncio.Queue[Result | BaseException | None]] = {}
        # Told of every failed read: the client's lost-job watch takes one as a sign that
        # Redis may have restarted or failed over.
        self._on_read_failure = on_read_failure

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._read_loop(stream), name=f"reader-{stream}")
            for stream in self._streams
        ]

    async def stop(self) -> None:
        """Stop reading, set the stream's TTL, fail every waiter with ClientClosedError."""
        self._stopping = True
        with contextlib.suppress(RedisConnectionError, RedisTimeoutError):
            # The marker wakes the blocking XREAD, which then sees `_stopping`: a task
            # cancel alone is unreliable (redis-py can swallow one racing a reply).
            async with self._redis.pipeline(transaction=False) as pipe:
                for stream in self._streams:
                    pipe.xadd(stream, {"bye": "1"})
                    pipe.expire(stream, self._ttl_s)
                await pipe.execute()
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=self._block_ms / 1000 + 1)
            await cancel_and_wait(pending)
        for futures in self._waiters.values():
            for fut in futures:
                if not fut.done():
                    fut.set_exception(ClientClosedError("client closed"))
        for queue in self._queues.values():
            queue.put_nowait(_CLOSED)

    # -- registration (before the job is sent: its result may come back at once) -----

    def expect(self, job_id: str, *, stream: bool) -> None:
        self._outstanding.add(job_id)
        if stream:
            self._queues.setdefault(job_id, asyncio.Queue())

    def is_outstanding(self, job_id: str) -> bool:
        return job_id in self._outstanding

    def is_streamed(self, job_id: str) -> bool:
        return job_id in self._queues

    def take_buffered(self, job_id: str) -> Result | None:
        return self._finals.pop(job_id, None)

    def settle(self, job_id: str) -> None:
        """The caller got the final result elsewhere (the result key): stop expecting it."""
        self._outstanding.discard(job_id)

    def fail(self, job_id: str, error: BaseException) -> None:
        """Raise `error` to whoever waits on `job_id` now (e.g. Redis lost the job). The id
        stays expected: a result that still comes (a worker ran it) is kept for the next call."""
        for fut in self._waiters.pop(job_id, []):
            if not fut.done():
                fut.set_exception(error)
        queue = self._queues.get(job_id)
        if queue is not None:
            queue.put_nowait(error)

    def forget(self, job_id: str) -> None:
        """Nothing of ours will come for this id (its submission queued nothing)."""
        self._outstanding.discard(job_id)
        self._queues.pop(job_id, None)

    # -- waiting ------------------------------------------------------------------------

    async def wait_final(self, job_id: str, timeout: float | None) -> Result:
        """Raises asyncio.TimeoutError (the id stays expected) or ClientClosedError."""
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(fut)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        finally:
            futures = self._waiters.get(job_id, [])
            if fut in futures:
                futures.remove(fut)
            if not futures:
                self._waiters.pop(job_id, None)

    async def next_item(self, job_id: str, timeout: float | None) -> Result:
        """Next delta or final of a stream job (asyncio.TimeoutError after `timeout`, or the
        error given to `fail`)."""
        item = await asyncio.wait_for(self._queues[job_id].get(), timeout)
        if item is _CLOSED:
            raise ClientClosedError("client closed")
        if isinstance(item, BaseException):
            raise item
        return item

    def drop_stream(self, job_id: str) -> None:
        self._queues.pop(job_id, None)

    # -- reading ------------------------------------------------------------------------

    async def _read_loop(self, stream: str) -> None:
        last_id = b"0-0"
        refresh_at = 0.0
        backoff = 0.1
        while not self._stopping:
            try:
                if time.monotonic() >= refresh_at:
                    await self._touch(stream)
                    refresh_at = time.monotonic() + self._ttl_s / 4
                response = await self._redis.xread(
                    {stream: last_id}, count=_READ_COUNT, block=self._block_ms
                )
                for _name, entries in response or ():
                    for entry_id, entry in entries:
                        last_id = entry_id
                        self._dispatch_entry(entry_id, entry)
                if response:
                    await self._redis.xtrim(stream, minid=last_id)
                backoff = 0.1
            except Exception as exc:
                if self._on_read_failure is not None:
                    self._on_read_failure()
                # The stream may be gone with Redis's data: give it its TTL again once back.
                refresh_at = 0.0
                # A dead reader would leave every waiter hanging: log and go on.
                if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
                    log.warning("reply reader: %s; retrying in %.1fs", exc, backoff)
                else:
                    log.exception("reply reader failed; retrying in %.1fs", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _touch(self, stream: str) -> None:
        # EXPIRE needs the key: create the stream with a marker entry once (XTRIM
        # empties it later, but an empty stream stays a key).
        if not await self._redis.expire(stream, self._ttl_s):
            await self._redis.xadd(stream, {"hello": "1"})
            await self._redis.expire(stream, self._ttl_s)

    def _dispatch_entry(self, entry_id: bytes, entry: dict[bytes, bytes]) -> None:
        payload = entry.get(RESULT_FIELD.encode())
        if payload is None:
            return  # our own hello / bye markers
        try:
            result = decode_result(payload)
        except (ValueError, TypeError) as exc:
            log.warning("reply entry %r is not a v1 result: %s", entry_id, exc)
            return
        self._dispatch(result)

    def _dispatch(self, result: Result) -> None:
        queue = self._queues.get(result.id)
        if not result.final:
            if queue is not None:
                queue.put_nowait(result)
            return
        self._outstanding.discard(result.id)
        waiters = [f for f in self._waiters.pop(result.id, []) if not f.done()]
        for fut in waiters:
            fut.set_result(result)
        if queue is not None:
            queue.put_nowait(result)
        elif not waiters:
            self._finals[result.id] = result
            while len(self._finals) > self._max_buffered:
                self._finals.popitem(last=False)
