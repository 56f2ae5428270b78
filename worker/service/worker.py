"""Worker service: wires ingest → engine thread → publish on one asyncio (uvloop) event loop.

Loop shape (after arq): one reader task claims → reaps → reads with
backpressure; a heartbeat task keeps claims fresh; a pub/sub task cancels jobs;
the publisher flushes results. Stop (SIGTERM/SIGINT, or burst mode running
dry) stops reading, lets in-flight jobs finish within the drain timeout, and
leaves the rest pending for other workers. Every Redis call rides out outages
(worker/service/resilience.py); a background task that dies stops the worker with exit 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import redis.exceptions

from worker.protocol import STATUS_CANCELLED
from worker.redis_url import connect_async, redact_url
from worker.service.engine_loop import EngineEvent, EngineLoop
from worker.service.intake import Intake
from worker.service.jobs import JobState, JobTable
from worker.service.metrics import Health, Metrics, MetricsServer, monitor
from worker.service.publish import Publisher
from worker.service.reader import StreamReader
from worker.service.recovery import Recovery
from worker.service.resilience import TRANSIENT, Interrupted, Retrier, Supervisor
from worker.service.settings import WorkerConfig
from worker.service.tokenizing import PromptEncoder

if TYPE_CHECKING:
    from worker.engine.engine import Engine

log = logging.getLogger(__name__)

# Best effort on the way out (releasing claims, forgetting liveness): nothing to retry for.
_EXIT_ERRORS = (*TRANSIENT, redis.exceptions.RedisError)
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
        engine: Engine | None = None,
        engine_host: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        if config.redis_url is None:
            raise ValueError("WorkerService needs a redis_url (run_worker starts an embedded one)")
        self.config = config
        self.keys = config.keys
        self.engine = engine
        self._engine_host = engine_host
        self.jobs = JobTable(config.inflight_limit)
        self.num_engine_failures = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None
        self._closing: asyncio.Event | None = None
        self._force = False
        self.exit_code = 0
        self.supervisor = Supervisor(self._task_died)
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
    def inflight(self) -> dict[str, JobState]:
        """The jobs held now, by id (read-only: the job table owns it)."""
        return self.jobs.inflight

    @property
    def num_dead_lettered(self) -> int:
        return self.intake.num_dead_lettered

    @property
    def num_failed(self) -> int:
        return self.intake.num_refused + self.num_engine_failures

    def stats(self) -> dict[str, Any]:
        return {
            "consumer": self.config.consumer,
            "inflight": len(self.jobs),
            "peak_inflight": self.jobs.peak,
            "max_inflight": self.config.inflight_limit,
            "read": self.reader.num_read,
            "reclaimed": self.recovery.num_reclaimed,
            "adopted": self.recovery.num_adopted,
            "published": self.publisher.num_published,
            "duplicates": self.publisher.num_duplicates,
            "dead_lettered": self.intake.num_dead_lettered,
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
        # retries=0: every failure reaches self._retry, which knows when to look for
        # entries delivered by a call whose reply was lost (Recovery.adopt).
        self.redis = connect_async(
            cfg.redis_url,
            timeout_s=cfg.redis_timeout_s,
            block_ms=cfg.read_block_ms,
            retries=0,
            client_name=f"headrace-worker:{cfg.consumer}",
        )
        self._build_stages()
        try:
            if await self._open():
                await self._read_loop()
                await self._drain()
        except Exception:
            # The read loop is a background task like the others: loud, and exit non-zero.
            log.exception("the read loop died")
            self._task_died("read loop")
        finally:
            await self._shutdown()
        return self.exit_code

    async def _open(self) -> bool:
        """Group, engine thread, background tasks; True once subscribed to cancels."""
        cfg = self.config
        assert self._stopping is not None and self._closing is not None
        assert cfg.redis_url is not None
        try:
            await self._retry.call(
                "creating the consumer group", self.reader.ensure_group, stop=self._stopping
            )
            await self._retry.call("reading own claims", self.recovery.inherit, stop=self._stopping)
        except Interrupted:
            return False  # stopped before Redis was ever reachable
        self.engine_loop.start()
        subscribed = asyncio.Event()
        self._spawn_loop("publisher", self.publisher.run())
        self._spawn_loop("heartbeat", self._heartbeat_loop())
        self._spawn_loop(
            "cancel listener",
            self.reader.listen_cancels(
                self._cancel, subscribed, self._closing, held=self.jobs.job_ids
            ),
        )
        self._spawn_loop(
            "monitor",
            monitor(
                self.metrics,
                self.health,
                self.redis.ping,
                lambda: len(self.jobs),
                self._closing,
                log_every_s=self.config.throughput_log_s,
            ),
        )
        await _first_of(subscribed, self._stopping)
        if not subscribed.is_set():
            return False
        self.ready.set()
        log.info(
            "worker %s ready on %s (%s)",
            self.config.consumer,
            ", ".join(self.keys.request_streams),
            redact_url(cfg.redis_url),
        )
        return True

    def _build_stages(self) -> None:
        cfg, engine = self.config, self.engine
        assert engine is not None and self._loop is not None and self._closing is not None
        self.reader = StreamReader(
            self.redis,
            self.keys,
            cfg.consumer,
            priority_aging_s=cfg.engine.scheduler.priority_aging_s,
        )
        self.encoder = PromptEncoder(
            engine.tokenizer,
            max_model_len=engine.max_model_len,
            vocab_size=engine.vocab_size,
            threads=cfg.tokenizer_threads,
        )
        self.recovery = Recovery(
            self.redis,
            self.keys,
            cfg.consumer,
            claim_idle_ms=cfg.claim_idle_ms,
            max_attempts=cfg.max_attempts,
            liveness_ttl_s=max(1, math.ceil(cfg.claim_idle_ms / 1000)),
            held=self.jobs.held_entries,
        )
        self._retry = Retrier(self.reader.ensure_group)
        self.publisher = Publisher(
            self.redis,
            self.keys,
            worker=cfg.consumer,
            result_ttl_s=cfg.result_ttl_s,
            reply_maxlen=cfg.reply_maxlen,
            on_acked=self._release,
            metrics=self.metrics,
        )
        self.engine_loop = EngineLoop(
            engine, self._loop, self._on_engine_event, self.metrics, host=self._engine_host
        )
        self.intake = Intake(
            keys=self.keys,
            max_payload_bytes=cfg.max_payload_bytes,
            max_attempts=cfg.max_attempts,
            jobs=self.jobs,
            reader=self.reader,
            recovery=self.recovery,
            publisher=self.publisher,
            encoder=self.encoder,
            engine_loop=self.engine_loop,
            metrics=self.metrics,
            retry=self._retry,
            supervisor=self.supervisor,
            tokenizer=engine.tokenizer,
            closing=self._closing,
            on_change=self._notify,
        )

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # embedded in a test or another program: the caller stops us
        assert self._loop is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._stop_now, False)

    def _spawn_loop(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        self.supervisor.spawn(name, coro, loop=True)

    def _task_died(self, name: str) -> None:
        """A background task failed: /healthz fails, and the worker stops with exit 1 (its
        jobs stay pending for other workers) so the orchestrator restarts it."""
        self.health.task_died(name)
        self.exit_code = 1
        if self._stopping is not None:
            self._stop_now(force=True)

    async def _drain(self) -> None:
        assert self._changed is not None
        deadline = time.monotonic() + self.config.drain_timeout_s
        while not self.jobs.empty and not self._force:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        await self._abandon([s for s in self.jobs if not s.done])
        if "publisher" in self.health.dead_tasks:
            return  # nobody writes what is queued: it stays pending for other workers
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
            self.jobs.release(state)
        with contextlib.suppress(*_EXIT_ERRORS):
            await self.recovery.release([s.ref for s in states])

    async def _shutdown(self) -> None:
        assert self._closing is not None
        self.supervisor.closing = True  # loops that end from here on are not deaths
        self._closing.set()
        # Bounded: redis-py can swallow a cancel that lands mid-command; the loops also
        # watch _closing, so they end on their own right after.
        await self.supervisor.stop(_TASK_EXIT_S)
        await asyncio.to_thread(self.engine_loop.stop)
        self.encoder.close()
        with contextlib.suppress(*_EXIT_ERRORS):
            await self.recovery.leave()
        await self.redis.aclose()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        log.info("worker %s stopped: %s", self.config.consumer, self.stats())

    # -- reading -------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        assert self._stopping is not None and self._changed is not None
        next_reclaim = 0.0
        while not self._stopping.is_set():
            if self.jobs.room <= 0:
                self._changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), self.config.heartbeat_s)
                continue
            reclaim = self.config.burst or time.monotonic() >= next_reclaim
            try:
                got = await self._fetch(reclaim)
            except Interrupted:
                break
            if reclaim:
                next_reclaim = time.monotonic() + self.config.heartbeat_s
            if not got and self.config.burst and self._idle():
                log.info("burst: queue empty, stopping")
                self._stopping.set()

    def _idle(self) -> bool:
        """Nothing held and nothing left to adopt (burst mode stops then)."""
        return self.jobs.empty and not self.recovery.adoption_due

    async def _fetch(self, reclaim: bool) -> int:
        """One round: adopt our orphans, reclaim idle entries, read new ones; how many came.

        NOTE: each step's entries are admitted as soon as they arrive, so a later step that
        fails never loses them, and a retry reads nothing twice: a retry after a dropped
        connection costs no delivery.
        """
        recovery, admit, got = self.recovery, self.intake.admit, 0
        if recovery.adoption_due:
            got += admit(await self._call("adopting entries", recovery.adopt))
        if reclaim:
            got += admit(
                await self._call("reclaiming jobs", lambda: recovery.reclaim(self.jobs.room))
            )
        if self.jobs.room > 0:
            # Blocks only when nothing came: admitted entries are waiting for their start.
            block = None if got else self.config.read_block_ms
            got += admit(
                await self._call("reading jobs", lambda: self.reader.read(self.jobs.room, block))
            )
        return got

    async def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        # A failed read or claim may have delivered entries whose reply was lost: look
        # for them under our own name before the next read.
        def suspect(_exc: BaseException) -> None:
            self.recovery.adoption_due = True

        return await self._retry.call(what, fn, stop=self._stopping, on_error=suspect)

    # -- engine and publish ---------------------------------------------------------------

    def _on_engine_event(self, event: EngineEvent) -> None:
        if event.crashed:
            # Exit non-zero for a restart; unfinished jobs stay pending for other workers.
            self.exit_code = 1
            self._stop_now(force=True)
        for out in event.outputs:
            state = self.jobs.live(out.request_id)
            if state is None:
                continue
            if self.publisher.on_output(state, out):
                self.engine_loop.abort(out.request_id, "stop")
        for request_id, error in event.failures:
            state = self.jobs.live(request_id)
            if state is not None:
                self.num_engine_failures += 1
                self.publisher.fail(state, error)

    def _release(self, state: JobState) -> None:
        self.jobs.release(state)
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    # -- background loops -------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        assert self._closing is not None
        recovery = self.recovery
        while not self._closing.is_set():
            try:
                await self._retry.call(
                    "heartbeat",
                    lambda: recovery.heartbeat(self.jobs.held_entries(), self.stats()),
                    stop=self._closing,
                )
            except Interrupted:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.config.heartbeat_s)

    def _cancel(self, job_id: str) -> None:
        state = self.jobs.live(job_id)
        if state is None:
            return
        state.cancel_requested = True
        if state.running:
            # Frees its KV blocks at the engine's next inbox drain; the result goes out now.
            self.engine_loop.abort(job_id, "abort")
            self.publisher.final(state, STATUS_CANCELLED, "abort")
        # Not started yet: intake answers `cancelled` once tokenization returns.


async def _first_of(*events: asyncio.Event) -> None:
    """Return once any of `events` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
