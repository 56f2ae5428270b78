"""Bulk runner (producer side of `headrace bulk`): stream a JSONL file through the workers.

The input is read line by line (never whole) and at most `window` jobs are in flight;
each final result is appended to the output as one whole line as soon as it arrives
(completion order, like the OpenAI Batch API). Re-running with the same output skips
the ids already there, after cutting a torn last line, so a crash or Ctrl-C loses at
most the in-flight window. Without a Redis URL an embedded redis-server and one local
`headrace worker` child process are started on first need and stopped at the end.
Jobs that Redis loses mid-run (a restart, a failover, a FLUSHALL) are noticed by the
lost-job watch and resubmitted, so every line is still answered exactly once.

NOTE: ~350 lines: the run, its resume and its lost-job watch wiring are one sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from producer.bulk_formats import FORMATS, BulkItem, error_line, parse_line, result_line
from producer.bulk_io import AUTO, OutputFile, count_lines, input_lines, resolve_format
from producer.bulk_local import LocalStack
from producer.client import AsyncClient, JobLostError, ResultTimeoutError
from producer.lost_jobs import REDIS_ERRORS, LostJobWatch, WatchConfig
from producer.submission import Submission
from producer.tasks import cancel_and_wait
from worker.errors import RequestError
from worker.keys import Keys
from worker.protocol import STATUS_OK, Result
from worker.redis_url import connect_async, keys_for, redact_url

log = logging.getLogger(__name__)

_SUBMIT_BATCH = 64  # jobs per pipelined XADD round trip
_CANCEL_TIMEOUT_S = 5.0


class BulkError(RuntimeError):
    """The run cannot go on (the local worker died, Redis is gone...)."""


@dataclass(frozen=True)
class BulkConfig:
    """One `headrace bulk` run.

    redis_url: None → an embedded Redis and one local worker started with `worker_flags`
        (e.g. ("--model", "smollm2")); else the workers already serving `namespace`.
    window: jobs submitted and not yet answered, at most.
    input_format: "auto" (decided from the first JSON object of the file), "simple", "openai".
    defaults: sampling params that each line's own params override.
    priority: the priority of lines that give none (OpenAI Batch lines have no such field):
        e.g. -1 keeps a bulk run behind the interactive jobs of the same workers.
    watch: when jobs count as lost by Redis (and are resubmitted), how long Redis may be down.
    """

    input_path: Path
    output_path: Path
    redis_url: str | None = None
    namespace: str = "headrace"
    window: int = 256
    input_format: str = AUTO
    defaults: Mapping[str, Any] = field(default_factory=dict)
    priority: int = 0
    worker_flags: tuple[str, ...] = ()
    progress: bool = True
    watch: WatchConfig = field(default_factory=WatchConfig)

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError("window must be >= 1")
        if self.input_format not in (AUTO, *FORMATS):
            raise ValueError(f"input_format must be one of {(AUTO, *FORMATS)}")
        Keys(self.namespace)


@dataclass(frozen=True)
class BulkSummary:
    """What one run wrote. requests: output lines written (errors included);
    resubmitted: jobs sent again because Redis lost them."""

    requests: int
    errors: int
    skipped: int
    resubmitted: int
    prompt_tokens: int
    completion_tokens: int
    wall_s: float
    interrupted: bool
    output_path: Path

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def describe(self) -> str:
        text = (
            f"{self.requests} requests ({self.errors} errors) in {self.wall_s:.1f} s; "
            f"{self.prompt_tokens} prompt + {self.completion_tokens} completion tokens, "
            f"{self.tokens_per_s:.1f} completion tok/s → {self.output_path}"
        )
        if self.skipped:
            text += f"; {self.skipped} ids skipped (already in the output)"
        if self.resubmitted:
            text += f"; {self.resubmitted} jobs resubmitted (Redis lost them)"
        if self.interrupted:
            text += "; interrupted: run the same command again to resume"
        return text


async def run_bulk(config: BulkConfig) -> BulkSummary:
    """Run the whole file; returns the summary (also when interrupted by SIGINT/SIGTERM).

    Raises:
        BulkError when the local worker dies; redis errors when Redis goes away.
    """
    fmt = resolve_format(config.input_path, config.input_format)
    total = count_lines(config.input_path) if config.progress else None
    out = OutputFile(config.output_path)
    log.info("bulk: %s format, %d ids already in %s", fmt, len(out.done_keys), out.path)
    bar = tqdm(
        total=None if total is None else max(total - len(out.done_keys), 0),
        unit="req",
        disable=not config.progress,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    run = _Run(config, fmt, out, bar)
    try:
        with _on_signals(run.interrupt):
            run.task = asyncio.create_task(run.feed())
            try:
                await run.task
            except asyncio.CancelledError:
                if not (run.interrupted or run.failure):
                    raise
    finally:
        await run.close()
        bar.close()
    if run.failure is not None:
        raise run.failure
    return run.summary()


class _Run:
    """State of one run: the window, the jobs in flight, the counters."""

    def __init__(self, config: BulkConfig, fmt: str, out: OutputFile, bar: tqdm) -> None:
        self.config, self.fmt, self.out, self.bar = config, fmt, out, bar
        self.task: asyncio.Task[None] | None = None
        self.interrupted = False
        self.failure: BaseException | None = None
        self._slots = asyncio.Semaphore(config.window)
        self._run_id = uuid.uuid4().hex[:12]  # job ids never collide with earlier runs' results
        self._inflight: dict[str, BulkItem] = {}
        self._submissions: dict[str, Submission] = {}  # of the jobs in flight
        self._lost = LostJobWatch(config.watch)
        self._waiters: set[asyncio.Task[None]] = set()
        self._seen: set[str] = set()
        self._client: AsyncClient | None = None
        self._local: LocalStack | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._start = time.monotonic()
        self._counts = dict.fromkeys(
            ("requests", "errors", "skipped", "resubmitted", "prompt", "completion"), 0
        )

    async def feed(self) -> None:
        batch: list[BulkItem] = []
        for line_no, raw in input_lines(self.config.input_path):
            if self.interrupted or self.failure is not None:
                # Its cancel was lost in a redis call (producer/tasks.py): stop here instead.
                raise asyncio.CancelledError
            item = parse_line(self.fmt, raw, line_no, self.config.defaults)
            if item.key in self.out.done_keys:
                self._counts["skipped"] += 1
                continue
            if item.key in self._seen:
                item = _duplicate(item)
            self._seen.add(item.key)
            if item.job is None:
                assert item.error is not None
                self._emit(error_line(self.fmt, item, item.error), None)
                continue
            if self.config.priority and "priority" not in item.job:
                item = replace(item, job={**item.job, "priority": self.config.priority})
            if self._slots.locked() and batch:
                await self._submit(batch)  # send what we hold before waiting for a slot
                batch = []
            await self._slots.acquire()
            batch.append(item)
            if len(batch) >= _SUBMIT_BATCH:
                await self._submit(batch)
                batch = []
        if batch:
            await self._submit(batch)
        while self._waiters:
            await asyncio.gather(*list(self._waiters))

    async def _submit(self, batch: list[BulkItem]) -> None:
        client = await self._connect()
        jobs = [{**item.job, "id": f"bulk-{self._run_id}-{item.line_no}"} for item in batch]
        for job, item in zip(jobs, batch, strict=True):
            self._inflight[job["id"]] = item
        self._track(await self._lost.enqueue(client, jobs, resubmit=False))
        for job in jobs:
            waiter = asyncio.create_task(self._collect(client, job["id"]))
            self._waiters.add(waiter)
            waiter.add_done_callback(self._waiters.discard)

    def _track(self, subs: list[Submission]) -> None:
        for sub in subs:
            if sub.id in self._inflight:  # not answered while it was being sent
                self._submissions[sub.id] = sub

    async def _resubmit(self, job_ids: list[str]) -> None:
        lost = [i for i in job_ids if i in self._inflight]
        if not lost or self._client is None:
            return
        log.warning("resubmitting %d jobs that Redis lost", len(lost))
        jobs = [{**self._inflight[i].job, "id": i} for i in lost]
        self._track(await self._lost.enqueue(self._client, jobs, resubmit=True))
        self._counts["resubmitted"] += len(lost)

    async def _collect(self, client: AsyncClient, job_id: str) -> None:
        while True:
            try:
                # Past the timeout result() reads the stored result, in case our reply was lost.
                result = await client.result(job_id, self.config.watch.lost_after_s)
                break
            except JobLostError:
                await asyncio.sleep(self.config.watch.check_s)  # the watch resubmits it
            except (ResultTimeoutError, *REDIS_ERRORS):
                continue  # the watch resubmits the job if Redis lost it
        item = self._inflight.pop(job_id)
        self._submissions.pop(job_id, None)
        self._emit(result_line(self.fmt, item, job_id, result), result)
        self._slots.release()

    def _emit(self, line: Mapping[str, Any], result: Result | None) -> None:
        self.out.write(line)
        counts = self._counts
        counts["requests"] += 1
        if result is None or result.status != STATUS_OK:
            counts["errors"] += 1
        else:
            counts["prompt"] += int((result.usage or {}).get("prompt_tokens", 0))
            counts["completion"] += int((result.usage or {}).get("completion_tokens", 0))
        tok_s = counts["completion"] / max(time.monotonic() - self._start, 1e-9)
        self.bar.set_postfix_str(f"{tok_s:.0f} tok/s, {counts['errors']} errors", refresh=False)
        self.bar.update(1)

    async def _connect(self) -> AsyncClient:
        if self._client is not None:
            return self._client
        url = self.config.redis_url
        if url is None:
            self._local = LocalStack.start(self.config.namespace, self.config.worker_flags)
            url = self._local.url
            self._watchdog = asyncio.create_task(self._watch_worker(self._local))
        # The run's own watch resubmits lost jobs: the client's would only locate them twice.
        client = AsyncClient(url, self.config.namespace, lost_check_s=None)
        await client.connect()
        self._client = client
        self._watch_task = asyncio.create_task(self._watch(client))
        if self._local is None:
            await _warn_without_workers(url, keys_for(url, self.config.namespace))
        return client

    async def _watch(self, client: AsyncClient) -> None:
        try:
            await self._lost.run(client, lambda: list(self._submissions.values()), self._resubmit)
        except Exception as exc:  # RedisGoneError, or a bug: never run on unwatched
            self.failure = exc
            if self.task is not None:
                self.task.cancel()

    async def _watch_worker(self, local: LocalStack) -> None:
        code = await local.wait_exit()
        self.failure = BulkError(f"the local worker exited with code {code}:\n{local.log_tail()}")
        if self.task is not None:
            self.task.cancel()

    def interrupt(self) -> None:
        if not self.interrupted and self.task is not None:
            log.warning("interrupted: stopping (the output keeps every finished line)")
            self.interrupted = True
            self.task.cancel()

    async def close(self) -> None:
        """Stop waiting, cancel unanswered jobs on shared Redis, stop the local stack."""
        await cancel_and_wait([*self._waiters, self._watchdog, self._watch_task])
        if self._client is not None:
            if self._inflight and self._local is None:
                # Nobody will read these results: free the shared workers from them.
                cancels = [self._client.cancel(job_id) for job_id in self._inflight]
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.gather(*cancels), _CANCEL_TIMEOUT_S)
            await self._client.close()
        if self._local is not None:
            failed = self.failure is not None
            await asyncio.to_thread(self._local.stop, not (self.interrupted or failed), failed)
        self.out.close()

    def summary(self) -> BulkSummary:
        c = self._counts
        return BulkSummary(
            requests=c["requests"],
            errors=c["errors"],
            skipped=c["skipped"],
            resubmitted=c["resubmitted"],
            prompt_tokens=c["prompt"],
            completion_tokens=c["completion"],
            wall_s=time.monotonic() - self._start,
            interrupted=self.interrupted,
            output_path=self.out.path,
        )


def _duplicate(item: BulkItem) -> BulkItem:
    error = RequestError("invalid_request", f"duplicate {item.key_field} {item.key!r}")
    return BulkItem(item.line_no, item.key, item.key_field, error=error, url=item.url)


async def _warn_without_workers(url: str, keys: Keys) -> None:
    client = connect_async(url)
    try:
        async for _ in client.scan_iter(match=keys.worker("*"), count=1000):
            return
        log.warning(
            "no live worker on %s yet: jobs wait in %s%s until one starts",
            redact_url(url),
            keys.requests,
            f" and {keys.shards - 1} more shards" if keys.shards > 1 else "",
        )
    finally:
        await client.aclose()


@contextlib.contextmanager
def _on_signals(handler: Callable[[], None]) -> Iterator[None]:
    """SIGINT/SIGTERM call `handler` on the loop (main thread only) instead of raising."""
    loop = asyncio.get_running_loop()
    sigs = (signal.SIGINT, signal.SIGTERM)
    installed = threading.current_thread() is threading.main_thread()
    if installed:
        for sig in sigs:
            loop.add_signal_handler(sig, handler)
    try:
        yield
    finally:
        if installed:
            for sig in sigs:
                loop.remove_signal_handler(sig)
