"""AsyncClient (producer side of protocol v1): submit jobs to the request stream, read results.

Each client owns one reply stream `{ns}:reply:{client_id}` (one per shard when the
namespace is sharded: a job's results come back in its own shard) and a reader that
demultiplexes its results to waiting futures and per-id delta queues,
so clients sharing a Redis never take each other's results. A lost-job watch
(producer/lost_jobs.py) notices jobs that Redis lost (a restart without data, a failover
to a lagging replica): it counts them (`lost_jobs`) and fails their waiters with
JobLostError instead of leaving them to wait forever.

NOTE: ~380 lines: one class whose reader task and waiters share state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from producer.lost_jobs import LostJobWatch, WatchConfig
from producer.replies import ClientClosedError, ReplyRouter
from producer.submission import LOST, Submission, Submitter
from producer.tasks import cancel_and_wait
from worker.embedded import EmbeddedRedis, start_embedded_redis
from worker.layout import agree_layout
from worker.params import SamplingParams, check_length_hint
from worker.protocol import Job, Result, decode_result, new_job_id
from worker.redis_url import connect_async, keys_for

log = logging.getLogger(__name__)

REDIS_URL_ENV = "HEADRACE_REDIS_URL"
_SUBMIT_CHUNK = 512
_POLL_MAX_S = 0.5
_JOB_ITEM_FIELDS = frozenset(
    {
        "id",
        "prompt",
        "messages",
        "prompt_token_ids",
        "params",
        "stream",
        "deadline_ms",
        "priority",
        "length_hint",
    }
)


class ResultTimeoutError(TimeoutError):
    """No final result for `job_id` within `timeout` seconds (the job may still run)."""

    def __init__(self, job_id: str, timeout: float | None) -> None:
        super().__init__(f"no result for job {job_id!r} within {timeout} s")
        self.job_id = job_id
        self.timeout = timeout


class JobLostError(ResultTimeoutError):
    """Redis lost job `job_id` (a restart without data, a failover to a replica that had not
    received it, a FLUSHALL): it has no result, no stream entry and no pending entry.

    Its result will not come unless you submit it again (the same id is fine: `submit`, or
    `enqueue(..., resubmit=True)`). A worker that was already running it may still answer:
    a later `result()` returns that result if it comes.
    """

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id, None)
        self.args = (f"Redis lost job {job_id!r} (restart, failover or flush): submit it again",)


class AsyncClient:
    """Producer client on redis.asyncio. Use `async with AsyncClient(url) as c:`.

    redis_url: None → $HEADRACE_REDIS_URL, else an embedded redis-server owned by
        this client (stopped on close; `.redis_url` tells workers where to join).
    client_id: names the reply stream; reusing one resumes its unread results.
    reply_ttl_s: TTL of the reply stream, refreshed while open and set on close.
    max_buffered: final results kept for ids nobody waits on yet (oldest dropped
        first; those stay fetchable from the result key for the worker's TTL).
    claim_ttl_s: how long a submitted id stays claimed, so that a second submission of it
        queues nothing (keep it at least the workers' --result-ttl, default one day).
    lost_check_s: how often the server's identity is checked (one command); after a sign
        that Redis lost data (a new run_id, a failed read) this client's jobs in flight are
        located and the lost ones counted in `lost_jobs` and failed with JobLostError.
        None: no watch (`result()` still reports a lost job when its timeout expires).
    """

    def __init__(
        self,
        redis_url: str | None = None,
        namespace: str = "headrace",
        *,
        client_id: str | None = None,
        reply_ttl_s: int = 3600,
        cancel_ttl_s: int = 3600,
        max_buffered: int = 10_000,
        block_ms: int = 1000,
        claim_ttl_s: int = 86_400,
        lost_check_s: float | None = 2.0,
    ) -> None:
        self.redis_url = redis_url or os.environ.get(REDIS_URL_ENV) or None
        self.keys = keys_for(self.redis_url, namespace)
        self.client_id = client_id or uuid.uuid4().hex
        self.reply_stream = self.keys.reply(self.client_id)  # shard 0's (the only one unsharded)
        self._reply_ttl_s = reply_ttl_s
        self._cancel_ttl_s = cancel_ttl_s
        self._max_buffered = max_buffered
        self._block_ms = block_ms
        self._claim_ttl_s = claim_ttl_s
        self._embedded: EmbeddedRedis | None = None
        self._redis: aioredis.Redis | None = None
        self._router: ReplyRouter | None = None
        self._submitter: Submitter | None = None
        # Ids whose submission here found an earlier one (the most recent max_buffered).
        self._reused: OrderedDict[str, None] = OrderedDict()
        # Jobs this client queued and has no final result for yet (pruned by the watch).
        self._in_flight: dict[str, Submission] = {}
        # Ids found lost (the most recent max_buffered) until submitted again.
        self._lost_ids: OrderedDict[str, None] = OrderedDict()
        self.lost_jobs = 0  # jobs found lost by Redis, each counted once
        self._watch: LostJobWatch | None = None
        if lost_check_s is not None:
            # Only signs trigger a locate here: a job out of sight for a while is reported
            # when a caller's timeout expires, not by polling every job in flight.
            config = WatchConfig(lost_check_s, lost_after_s=math.inf, redis_down_s=math.inf)
            self._watch = LostJobWatch(config)
        self._watch_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------

    async def connect(self) -> AsyncClient:
        """Connect (starting embedded Redis if no URL) and start the reply reader."""
        if self._redis is not None:
            return self
        if self.redis_url is None:
            # Blocks the loop ~20 ms once; the server dies with this thread (see embedded).
            self._embedded = start_embedded_redis()
            self.redis_url = self._embedded.url
            log.info("embedded Redis at %s (workers join with --redis-url)", self.redis_url)
        # The reply reader blocks up to block_ms per XREAD: the socket timeout allows for it.
        self._redis = connect_async(self.redis_url, block_ms=self._block_ms)
        await self._redis.ping()
        await agree_layout(self._redis, self.keys)  # LayoutMismatchError: workers read elsewhere
        self._submitter = Submitter(self._redis, self.keys, claim_ttl_s=self._claim_ttl_s)
        self._router = ReplyRouter(
            self._redis,
            self.keys.replies(self.client_id),
            ttl_s=self._reply_ttl_s,
            max_buffered=self._max_buffered,
            block_ms=self._block_ms,
            on_read_failure=self._watch.data_may_be_lost if self._watch is not None else None,
        )
        self._router.start()
        if self._watch is not None:
            with contextlib.suppress(ResponseError):  # INFO may be disabled
                self._watch.saw_server(await self.server_run_id())
            self._watch_task = asyncio.create_task(self._watch_lost(self._watch))
        return self

    async def close(self) -> None:
        """Stop reading, give the reply stream its TTL, fail waiters, stop embedded Redis."""
        if self._closed:
            return
        self._closed = True
        await cancel_and_wait([self._watch_task])
        if self._router is not None:
            await self._router.stop()
        if self._redis is not None:
            await self._redis.aclose()
        if self._embedded is not None:
            self._embedded.stop()

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- submitting --------------------------------------------------------------

    async def submit(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        prompt_token_ids: list[int] | None = None,
        id: str | None = None,
        stream: bool = False,
        deadline_ms: int | None = None,
        priority: int = 0,
        length_hint: int | None = None,
        params: Mapping[str, Any] | None = None,
        **sampling: Any,
    ) -> str:
        """Queue one job; returns its id. `params` and keyword sampling params merge.

        An `id` submitted before (by any client) queues nothing: the id is an idempotency
        key, and `result()` returns the earlier submission's result marked `reused`.
        `length_hint`: how many tokens you expect the job to generate (for workers admitting
        by predicted length); a positive int, bounded by max_tokens there.
        Raises:
            RequestError("invalid_params" or, for a bad length_hint, "invalid_request")
            before anything is sent.
        """
        item = {
            "id": id,
            "prompt": prompt,
            "messages": messages,
            "prompt_token_ids": prompt_token_ids,
            "stream": stream,
            "deadline_ms": deadline_ms,
            "priority": priority,
            "length_hint": length_hint,
            "params": {**(params or {}), **sampling},
        }
        return (await self.enqueue([item]))[0].id

    async def submit_many(self, items: Iterable[Mapping[str, Any]]) -> list[str]:
        """Queue many jobs, pipelined. Items: {"id"?, "prompt"|"messages"|"prompt_token_ids",
        "params"?, "stream"?, "deadline_ms"?, "priority"?, "length_hint"?} (the JSONL line
        format)."""
        return [sub.id for sub in await self.enqueue(items)]

    async def enqueue(
        self, items: Iterable[Mapping[str, Any]], *, resubmit: bool = False
    ) -> list[Submission]:
        """`submit_many`, telling for each job its stream entry and whether its id was `reused`.

        resubmit: queue the jobs even if their ids are claimed (for jobs Redis lost; a
            job that was not lost may then run twice, its second result is dropped).
        """
        jobs = [self._make_job(item) for item in items]
        subs: list[Submission] = []
        for start in range(0, len(jobs), _SUBMIT_CHUNK):
            subs += await self._send(jobs[start : start + _SUBMIT_CHUNK], resubmit)
        return subs

    def _make_job(self, item: Mapping[str, Any]) -> Job:
        unknown = set(item) - _JOB_ITEM_FIELDS
        if unknown:
            raise ValueError(f"unknown job field(s): {sorted(unknown)}")
        kinds = [k for k in ("prompt", "messages", "prompt_token_ids") if item.get(k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of prompt, messages, prompt_token_ids")
        params = dict(item.get("params") or {})
        SamplingParams.from_dict(params)  # fail here, not as an error result later
        messages, token_ids = item.get("messages"), item.get("prompt_token_ids")
        job_id = item.get("id") or new_job_id()
        return Job(
            id=job_id,
            reply_to=self.keys.reply(self.client_id, self.keys.shard_of(job_id)),
            prompt=item.get("prompt"),
            messages=tuple(dict(m) for m in messages) if messages is not None else None,
            prompt_token_ids=tuple(token_ids) if token_ids is not None else None,
            params=params,
            stream=bool(item.get("stream", False)),
            deadline_ms=item.get("deadline_ms"),
            priority=int(item.get("priority") or 0),
            length_hint=check_length_hint(item.get("length_hint")),
        )

    async def _send(self, jobs: Sequence[Job], resubmit: bool) -> list[Submission]:
        self._require()
        router, submitter = self._live_router(), self._submitter
        assert submitter is not None
        ours = {job.id for job in jobs if router.is_outstanding(job.id)}
        # Registered before XADD: the reader must know an id before its result can exist.
        for job in jobs:
            router.expect(job.id, stream=job.stream)
        subs = await submitter.send(jobs, resubmit=resubmit)
        ours |= {sub.id for sub in subs if not sub.reused}
        for sub in subs:
            if not sub.reused:
                self._reused.pop(sub.id, None)
                self._lost_ids.pop(sub.id, None)
                self._in_flight[sub.id] = sub
            else:
                self._reused[sub.id] = None
                while len(self._reused) > self._max_buffered:
                    self._reused.popitem(last=False)
                log.info("job id %r was submitted before: not queued again", sub.id)
                if sub.id not in ours:
                    router.forget(sub.id)  # its result comes to the earlier submitter
        return subs

    # -- results -----------------------------------------------------------------

    async def result(self, job_id: str, timeout: float | None = None) -> Result:
        """The final result of a job (waits up to `timeout` seconds; None = forever).

        Jobs of this client arrive on its reply stream; any other id (or one whose
        buffered result was dropped, or whose reply was lost) is read from the stored
        result key. A result marked `reused` is an earlier submission's: this client's
        submission of the id queued nothing.
        Raises:
            ResultTimeoutError (a TimeoutError) if no final result within `timeout`;
            JobLostError (one of those) as soon as Redis is found to have lost the job.
        """
        result = await self._result(job_id, timeout)
        return dataclasses.replace(result, reused=True) if job_id in self._reused else result

    async def _result(self, job_id: str, timeout: float | None) -> Result:
        router = self._live_router()
        if router.is_streamed(job_id):
            return await self._drain_stream(job_id, timeout)
        buffered = router.take_buffered(job_id)
        if buffered is not None:
            return buffered
        if not router.is_outstanding(job_id):
            return await self._poll_stored(job_id, timeout)
        if job_id in self._lost_ids:
            return await self._stored_or_lost(job_id)
        try:
            return await router.wait_final(job_id, timeout)
        except JobLostError:  # the watch found it lost (a TimeoutError too: caught first)
            return await self._stored_or_lost(job_id)
        except asyncio.TimeoutError:
            stored = await self.fetch_result(job_id)  # e.g. our reply stream was lost
            if stored is not None:
                router.settle(job_id)
                return stored
            sub = self._in_flight.get(job_id)
            if sub is not None and (await self.locate([sub])).get(job_id) == LOST:
                await self._report_lost([job_id])
                return await self._stored_or_lost(job_id)
            raise ResultTimeoutError(job_id, timeout) from None

    async def _stored_or_lost(self, job_id: str) -> Result:
        stored = await self.fetch_result(job_id)  # a worker that ran it anyway answered
        if stored is None:
            raise JobLostError(job_id)
        self._live_router().settle(job_id)
        return stored

    async def stream(self, job_id: str, timeout: float | None = None) -> AsyncIterator[Result]:
        """Yield `partial` deltas then the final result. `timeout` bounds each wait
        (ResultTimeoutError).

        Deltas exist only for jobs submitted with stream=True by this client; for
        others this yields just the final result. A job re-run after a worker crash
        restarts its deltas (higher `attempt`): restart the text when attempt changes.
        """
        router = self._live_router()
        if not router.is_streamed(job_id):
            yield await self.result(job_id, timeout)
            return
        try:
            while True:
                try:
                    item = await router.next_item(job_id, timeout)
                except JobLostError:
                    raise
                except asyncio.TimeoutError:
                    raise ResultTimeoutError(job_id, timeout) from None
                yield item
                if item.final:
                    return
        finally:
            router.drop_stream(job_id)

    async def locate(self, submissions: Sequence[Submission]) -> dict[str, str]:
        """Where each submitted job is: DONE, QUEUED or LOST (see producer.submission)."""
        self._require()
        assert self._submitter is not None
        return await self._submitter.locate(submissions)

    async def server_run_id(self) -> str:
        """The Redis server's run_id (a new one: it restarted or failed over)."""
        self._require()
        assert self._submitter is not None
        return await self._submitter.server_run_id()

    async def fetch_result(self, job_id: str) -> Result | None:
        """The stored final result of any job (None if unknown or past its TTL)."""
        payload = await self._require().get(self.keys.result(job_id))
        return decode_result(payload) if payload is not None else None

    async def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> Result:
        """Submit one job and wait for its final result."""
        return await self.result(await self.submit(prompt, **kwargs), timeout)

    async def cancel(self, job_id: str) -> None:
        """Cancel a job: running → aborted (KV freed at once); queued → cancelled on pickup."""
        client = self._require()
        # Marker first: a worker that picks the job up after the message still sees it.
        # Two commands, not a pipeline: a cluster pipeline cannot carry PUBLISH.
        await client.set(self.keys.cancelled(job_id), 1, ex=self._cancel_ttl_s)
        await client.publish(self.keys.cancel_channel, job_id)

    # -- jobs Redis lost ------------------------------------------------------------

    async def _watch_lost(self, watch: LostJobWatch) -> None:
        """Until close(): the lost-job watch over this client's jobs in flight, which locates
        them after a new run_id or a failed read and reports (does not resubmit) the lost."""
        while True:
            try:
                await watch.run(self, self._jobs_in_flight, self._report_lost)
            except Exception:  # RedisGoneError cannot come (redis_down_s is infinite)
                log.exception("lost-job watch failed; trying again")

    def _jobs_in_flight(self) -> list[Submission]:
        router = self._live_router()
        self._in_flight = {i: sub for i, sub in self._in_flight.items() if router.is_outstanding(i)}
        return list(self._in_flight.values())

    async def _report_lost(self, job_ids: list[str]) -> None:
        router = self._live_router()
        new = [i for i in dict.fromkeys(job_ids) if i not in self._lost_ids]
        for job_id in new:
            self._in_flight.pop(job_id, None)
            self._lost_ids[job_id] = None
            while len(self._lost_ids) > self._max_buffered:
                self._lost_ids.popitem(last=False)
            router.fail(job_id, JobLostError(job_id))
        self.lost_jobs += len(new)
        if new:
            log.warning(
                "Redis lost %d of this client's jobs (restart, failover or flush; %d so far): "
                "submit them again",
                len(new),
                self.lost_jobs,
            )

    async def _drain_stream(self, job_id: str, timeout: float | None) -> Result:
        async def last() -> Result:
            final = None
            async for item in self.stream(job_id):
                final = item
            assert final is not None and final.final
            return final

        try:
            return await asyncio.wait_for(last(), timeout)
        except asyncio.TimeoutError:
            raise ResultTimeoutError(job_id, timeout) from None

    async def _poll_stored(self, job_id: str, timeout: float | None) -> Result:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.02
        while True:
            stored = await self.fetch_result(job_id)
            if stored is not None:
                return stored
            if deadline is not None and time.monotonic() + delay > deadline:
                raise ResultTimeoutError(job_id, timeout)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX_S)

    def _require(self) -> aioredis.Redis:
        if self._closed:
            raise ClientClosedError("client closed")
        if self._redis is None:
            raise RuntimeError("client not connected: use `async with` or `await connect()`")
        return self._redis

    def _live_router(self) -> ReplyRouter:
        self._require()
        assert self._router is not None
        return self._router
