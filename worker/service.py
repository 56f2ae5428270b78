"""Worker service: wires ingest → engine thread → publish on one asyncio (uvloop) event loop.

Loop shape (after arq): one reader task claims → reaps → reads with
backpressure; a heartbeat task keeps claims fresh; a pub/sub task cancels jobs;
the publisher flushes results. Stop (SIGTERM/SIGINT, or burst mode running
dry) stops reading, lets in-flight jobs finish within the drain timeout, and
leaves the rest pending for other workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import redis.exceptions

from worker.engine.detokenizer import TextStream
from worker.engine.sequence import Request
from worker.engine_loop import EngineEvent, EngineLoop
from worker.errors import RequestError
from worker.ingest import ALREADY_DONE, CANCELLED, Ingest
from worker.metrics import Health, Metrics, MetricsServer, monitor
from worker.protocol import STATUS_CANCELLED, JobDecodeError
from worker.publish import JobState, Publisher, now_ms
from worker.recovery import Entry, Recovery
from worker.redis_url import connect_async, redact_url
from worker.settings import WorkerConfig

log = logging.getLogger(__name__)

_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
_RETRY_S = 0.5
_TASK_EXIT_S = 2.0


class WorkerService:
    """One worker process's pipeline. `run()` returns the exit code (0 on a clean stop).

    engine: a ready Engine (tests share one); None → built from config.engine.
    engine_host: runs the engine loop somewhere else than a thread of its own (the
        `headrace worker` process hands it to its main thread); None → its own thread.
    """

    def __init__(
        self,
        config: WorkerConfig,
        engine: Any | None = None,
        engine_host: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        if config.redis_url is None:
            raise ValueError("WorkerService needs a redis_url (run_worker starts an embedded one)")
        self.config = config
        self.keys = config.keys
        self.engine = engine
        self._engine_host = engine_host
        self.inflight: dict[str, JobState] = {}
        self.peak_inflight = 0
        self.num_dead_lettered = 0
        self.num_failed = 0
        # Entries refused (undecodable, or out of attempts) whose error result is not yet
        # written: their claims are kept fresh and a reclaim of one is ignored.
        self._refusing: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None
        self._closing: asyncio.Event | None = None
        self._force = False
        self.exit_code = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.ready = threading.Event()  # set once reading; for embedding programs and tests
        self.metrics = Metrics()
        self.health = Health()
        self.metrics_server: MetricsServer | None = None

    # -- public control -------------------------------------------------------------

    def request_stop(self, force: bool = False) -> None:
        """Stop reading and drain (force: skip the drain). Safe from any thread or signal."""
        if self._loop is None or self._stopping is None:
            return
        self._loop.call_soon_threadsafe(self._stop_now, force)

    def _stop_now(self, force: bool) -> None:
        assert self._stopping is not None and self._changed is not None
        self._force = self._force or force or self._stopping.is_set()
        self.health.stopping = True  # not ready while draining: send no new traffic here
        self._stopping.set()
        self._changed.set()

    @property
    def room(self) -> int:
        return self.config.inflight_limit - len(self.inflight) - len(self._refusing)

    def stats(self) -> dict[str, Any]:
        return {
            "consumer": self.config.consumer,
            "inflight": len(self.inflight),
            "peak_inflight": self.peak_inflight,
            "max_inflight": self.config.inflight_limit,
            "read": self.ingest.num_read,
            "reclaimed": self.recovery.num_reclaimed,
            "published": self.publisher.num_published,
            "duplicates": self.publisher.num_duplicates,
            "dead_lettered": self.num_dead_lettered,
            "steps": self.engine_loop.num_steps,
            "time": time.time(),
            **self.metrics.snapshot(),
        }

    # -- lifecycle --------------------------------------------------------------------

    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        self._stopping, self._changed = asyncio.Event(), asyncio.Event()
        self._closing = asyncio.Event()
        if self.engine is None:
            from worker.engine.engine import Engine

            self.engine = await asyncio.to_thread(Engine, self.config.engine)
        self.health.model_loaded = True
        if self.config.metrics_port:
            self.metrics_server = MetricsServer(
                self.metrics, self.health, self.config.metrics_host, self.config.metrics_port
            ).start()
        self._install_signals()
        cfg = self.config
        assert cfg.redis_url is not None
        self.redis = connect_async(
            cfg.redis_url,
            timeout_s=cfg.redis_timeout_s,
            block_ms=cfg.read_block_ms,
            client_name=f"headrace-worker:{cfg.consumer}",
        )
        self._build_stages()
        await self.ingest.ensure_group()
        self.engine_loop.start()
        subscribed = asyncio.Event()
        for coro in (
            self.publisher.run(),
            self._heartbeat_loop(),
            self.ingest.listen_cancels(self._cancel, subscribed, self._closing),
            monitor(
                self.metrics,
                self.health,
                self.redis.ping,
                lambda: len(self.inflight),
                self._closing,
                log_every_s=self.config.throughput_log_s,
            ),
        ):
            self._spawn(coro)
        await subscribed.wait()
        self.ready.set()
        log.info(
            "worker %s ready on %s (%s)",
            self.config.consumer,
            self.keys.requests,
            redact_url(self.config.redis_url),
        )
        try:
            await self._read_loop()
            await self._drain()
        finally:
            await self._shutdown()
        return self.exit_code

    def _build_stages(self) -> None:
        cfg, engine = self.config, self.engine
        self.ingest = Ingest(
            self.redis,
            self.keys,
            cfg.consumer,
            tokenizer=engine.tokenizer,
            max_model_len=engine.max_model_len,
            vocab_size=getattr(engine, "vocab_size", len(engine.tokenizer)),
            max_payload_bytes=cfg.max_payload_bytes,
            threads=cfg.tokenizer_threads,
        )
        self.recovery = Recovery(
            self.redis,
            self.keys,
            cfg.consumer,
            claim_idle_ms=cfg.claim_idle_ms,
            max_attempts=cfg.max_attempts,
            liveness_ttl_s=max(1, math.ceil(cfg.claim_idle_ms / 1000)),
        )
        self.publisher = Publisher(
            self.redis,
            self.keys,
            engine.tokenizer,
            worker=cfg.consumer,
            result_ttl_s=cfg.result_ttl_s,
            reply_maxlen=cfg.reply_maxlen,
            on_acked=self._release,
            metrics=self.metrics,
        )
        assert self._loop is not None
        self.engine_loop = EngineLoop(
            engine, self._loop, self._on_engine_event, self.metrics, host=self._engine_host
        )

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # embedded in a test or another program: the caller stops us
        assert self._loop is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._stop_now, False)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _drain(self) -> None:
        assert self._changed is not None
        deadline = time.monotonic() + self.config.drain_timeout_s
        while (self.inflight or self._refusing) and not self._force:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        await self._abandon([s for s in self.inflight.values() if not s.done])
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.publisher.wait_idle(), 5.0)

    async def _abandon(self, states: list[JobState]) -> None:
        """Leave unfinished jobs pending (not acked) and idle, for other workers to reclaim now."""
        if not states:
            return
        log.warning("drain timeout: leaving %d jobs pending for other workers", len(states))
        for state in states:
            state.done = True
            self.engine_loop.abort(state.job.id)
            self.inflight.pop(state.job.id, None)
        with contextlib.suppress(*_REDIS_ERRORS):
            await self.recovery.release([s.entry_id for s in states])

    async def _shutdown(self) -> None:
        assert self._closing is not None
        self._closing.set()
        for task in list(self._tasks):
            task.cancel()
        # Bounded: redis-py can swallow a cancel that lands mid-command; the loops also
        # watch _closing, so they end on their own right after.
        if self._tasks:
            _, stuck = await asyncio.wait(list(self._tasks), timeout=_TASK_EXIT_S)
            if stuck:
                log.warning("%d background tasks did not stop in time", len(stuck))
        await asyncio.to_thread(self.engine_loop.stop)
        self.ingest.close()
        with contextlib.suppress(*_REDIS_ERRORS):
            await self.recovery.leave()
        await self.redis.aclose()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        log.info("worker %s stopped: %s", self.config.consumer, self.stats())

    # -- ingest -------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        assert self._stopping is not None and self._changed is not None
        next_reclaim = 0.0
        while not self._stopping.is_set():
            if self.room <= 0:
                self._changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), self.config.heartbeat_s)
                continue
            try:
                entries: list[Entry] = []
                if self.config.burst or time.monotonic() >= next_reclaim:
                    entries = await self.recovery.reclaim(self.room)
                    next_reclaim = time.monotonic() + self.config.heartbeat_s
                block = None if entries else self.config.read_block_ms
                entries += await self.ingest.read(self.room - len(entries), block)
            except _REDIS_ERRORS as exc:
                log.warning("reading jobs failed (%r); retrying", exc)
                await asyncio.sleep(_RETRY_S)
                continue
            if entries:
                self._admit(entries)
            elif self.config.burst and not self.inflight and not self._refusing:
                log.info("burst: queue empty, stopping")
                self._stopping.set()

    def _admit(self, entries: list[Entry]) -> None:
        """Register entries as in flight at once (so cancels find them), then prepare them."""
        states = []
        for entry in entries:
            if entry.entry_id in self._refusing:
                continue  # our own refusal, reclaimed before its ack landed
            if self.recovery.exhausted(entry):
                self._dead_letter(entry)
                continue
            try:
                job = self.ingest.decode(entry)
            except JobDecodeError as err:
                self._reject(entry, err)
                continue
            holder = self.inflight.get(job.id)
            if holder is not None:
                # Our own entry reclaimed, or a resubmitted id: the running copy answers for it.
                if holder.entry_id != entry.entry_id:
                    self.publisher.ack(entry.entry_id)
                continue
            state = JobState(entry.entry_id, job, entry.attempt)
            self.inflight[job.id] = state
            states.append(state)
        self.peak_inflight = max(self.peak_inflight, len(self.inflight) + len(self._refusing))
        if states:
            self._spawn(self._prepare(states))

    async def _prepare(self, states: list[JobState]) -> None:
        try:
            verdicts = await self.ingest.screen([s.job for s in states])
            runnable = []
            for state, verdict in zip(states, verdicts, strict=True):
                if verdict == ALREADY_DONE:
                    state.done = True
                    self.publisher.ack(state.entry_id, lambda s=state: self._release(s))
                elif verdict == CANCELLED or state.cancel_requested:
                    self.publisher.final(state, STATUS_CANCELLED, "abort")
                elif (error := self.ingest.expired(state.job)) is not None:
                    self.publisher.fail(state, error)
                else:
                    runnable.append(state)
            tokenized = await self.ingest.tokenize([s.job for s in runnable])
        except _REDIS_ERRORS as exc:
            # Unacked and no longer refreshed: they go idle and are reclaimed later.
            log.warning("preparing %d jobs failed (%r); leaving them pending", len(states), exc)
            for state in states:
                if not state.done:
                    self._release(state)
            return
        ready = []
        for state, tok in zip(runnable, tokenized, strict=True):
            if tok.error is not None:
                self.publisher.fail(state, tok.error)
            elif state.cancel_requested:
                self.publisher.final(state, STATUS_CANCELLED, "abort")
            else:
                ready.append((state, tok.token_ids))
        for state, token_ids in sorted(ready, key=lambda item: -item[0].job.priority):
            self._start(state, token_ids)

    def _start(self, state: JobState, token_ids: tuple[int, ...]) -> None:
        params = state.job.sampling_params()  # validated by decode_job, cannot raise here
        state.request = Request(state.job.id, token_ids, params)
        if state.job.stream or params.stop:
            state.text = TextStream(self.engine.tokenizer, token_ids, params)
        state.started_ms = now_ms()
        self.metrics.add_prompt_tokens(len(token_ids))
        self.engine_loop.add(state.request)

    def _reject(self, entry: Entry, err: JobDecodeError) -> None:
        # Nobody to answer: keep the entry in the dead-letter stream for operators.
        job_id = err.job_id or entry.entry_id
        self._refuse(entry, err.error, job_id, err.reply_to, dead_letter=err.reply_to is None)

    def _dead_letter(self, entry: Entry) -> None:
        limit = self.config.max_attempts
        message = f"job was delivered {entry.attempt} times (max_attempts {limit})"
        log.warning("dead-lettering entry %s: %s", entry.entry_id, message)
        try:
            job = self.ingest.decode(entry)
            job_id, reply_to = job.id, job.reply_to
        except JobDecodeError as err:
            job_id, reply_to = err.job_id or entry.entry_id, err.reply_to
        error = RequestError("max_attempts_exceeded", message)
        self._refuse(entry, error, job_id, reply_to, dead_letter=True)

    def _refuse(
        self,
        entry: Entry,
        error: RequestError,
        job_id: str,
        reply_to: str | None,
        *,
        dead_letter: bool,
    ) -> None:
        fields = self.recovery.dead_letter_fields(entry, error) if dead_letter else None
        self._refusing.add(entry.entry_id)
        self.publisher.refuse(
            entry.entry_id,
            job_id,
            reply_to,
            error,
            entry.attempt,
            fields,
            lambda first: self._refused(entry.entry_id, first, dead_letter),
        )

    def _refused(self, entry_id: str, first: bool, dead_letter: bool) -> None:
        # Counted once written, and only by the write that published: under load an entry
        # can be reclaimed again while its refusal is in flight and be refused twice.
        self.num_failed += first
        self.num_dead_lettered += first and dead_letter
        self._refusing.discard(entry_id)
        self._notify()

    # -- engine and publish ---------------------------------------------------------------

    def _on_engine_event(self, event: EngineEvent) -> None:
        if event.crashed:
            # Exit non-zero for a restart; unfinished jobs stay pending for other workers.
            self.exit_code = 1
            self._stop_now(force=True)
        for out in event.outputs:
            state = self.inflight.get(out.request_id)
            if state is None or state.done:
                continue
            if self.publisher.on_output(state, out):
                self.engine_loop.abort(out.request_id, "stop")
        for request_id, error in event.failures:
            state = self.inflight.get(request_id)
            if state is not None and not state.done:
                self.num_failed += 1
                self.publisher.fail(state, error)

    def _release(self, state: JobState) -> None:
        if self.inflight.get(state.job.id) is state:
            del self.inflight[state.job.id]
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    # -- background loops -------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        assert self._closing is not None
        while not self._closing.is_set():
            try:
                entry_ids = [s.entry_id for s in self.inflight.values()]
                entry_ids += self._refusing
                await self.recovery.heartbeat(entry_ids, self.stats())
            except _REDIS_ERRORS as exc:
                log.warning("heartbeat failed: %r", exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.config.heartbeat_s)

    def _cancel(self, job_id: str) -> None:
        state = self.inflight.get(job_id)
        if state is None or state.done:
            return
        state.cancel_requested = True
        if state.running:
            # Frees its KV blocks at the engine's next inbox drain; the result goes out now.
            self.engine_loop.abort(job_id, "abort")
            self.publisher.final(state, STATUS_CANCELLED, "abort")
        # Not started yet: _prepare answers `cancelled` once tokenization returns.
