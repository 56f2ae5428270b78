"""Service stage: one worker's lifecycle — the stages wired (stages.py), the loops run, the stop.

Loop shape (after arq): the read loop (read_loop.py) claims → reaps → reads with
backpressure; a heartbeat task keeps claims fresh; a pub/sub task cancels jobs;
the publisher flushes results; engine events are routed to the publisher here. Stop (SIGTERM/SIGINT, or burst mode running
dry) stops reading, lets in-flight jobs finish within the drain timeout, and
leaves the rest pending for other workers. Every Redis call rides out outages
(worker/service/resilience.py); a background task that dies stops the worker with exit 1.

NOTE: ~350 lines: open → run → drain → shutdown is one sequence whose order matters
(what may still be written when, what is left pending), so it stays in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import redis.exceptions

from worker.layout import LayoutMismatchError, agree_layout
from worker.protocol import STATUS_CANCELLED
from worker.redis_url import connect_async, redact_url
from worker.service.engine_loop import EngineEvent
from worker.service.jobs import JobState, JobTable
from worker.service.metrics import Health, Metrics, MetricsServer, monitor
from worker.service.read_loop import ReadLoop
from worker.service.recovery import Recovery
from worker.service.resilience import TRANSIENT, Interrupted, Supervisor
from worker.service.settings import WorkerConfig
from worker.service.stages import Stages, build_stages

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
        self.stages: Stages  # built by run(), once the engine and Redis are there

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
    def recovery(self) -> Recovery:
        return self.stages.recovery

    @property
    def inflight(self) -> dict[str, JobState]:
        """The jobs held now, by id (read-only: the job table owns it)."""
        return self.jobs.inflight

    @property
    def num_dead_lettered(self) -> int:
        return self.stages.intake.num_dead_lettered

    @property
    def num_failed(self) -> int:
        return self.stages.intake.num_refused + self.num_engine_failures

    def stats(self) -> dict[str, Any]:
        return {
            "consumer": self.config.consumer,
            "inflight": len(self.jobs),
            "peak_inflight": self.jobs.peak,
            "max_inflight": self.config.inflight_limit,
            "read": self.stages.reader.num_read,
            "reclaimed": self.stages.recovery.num_reclaimed,
            "adopted": self.stages.recovery.num_adopted,
            "published": self.stages.publisher.num_published,
            "duplicates": self.stages.publisher.num_duplicates,
            "dead_lettered": self.stages.intake.num_dead_lettered,
            "steps": self.stages.engine_loop.num_steps,
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
        # retries=0: every failure reaches the stages' retrier, which knows when to look for
        # entries delivered by a call whose reply was lost (Recovery.adopt).
        self.redis = connect_async(
            cfg.redis_url,
            timeout_s=cfg.redis_timeout_s,
            block_ms=cfg.read_block_ms,
            retries=0,
            client_name=f"headrace-worker:{cfg.consumer}",
        )
        assert self.engine is not None
        self.stages = build_stages(
            cfg,
            self.engine,
            self.redis,
            self._loop,
            jobs=self.jobs,
            metrics=self.metrics,
            supervisor=self.supervisor,
            closing=self._closing,
            on_engine_event=self._on_engine_event,
            on_acked=self._release,
            on_change=self._notify,
            engine_host=self._engine_host,
        )
        try:
            if await self._open():
                s = self.stages
                read_loop = ReadLoop(
                    cfg, self.jobs, s.reader, s.recovery, s.intake, s.retry,
                    self._stopping, self._changed,
                )  # fmt: skip
                await read_loop.run()
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
            await self.stages.retry.call(
                "checking the key layout",
                lambda: agree_layout(self.redis, self.keys),
                stop=self._stopping,
            )
            await self.stages.retry.call(
                "creating the consumer group", self.stages.reader.ensure_group, stop=self._stopping
            )
            await self.stages.retry.call(
                "reading own claims", self.stages.recovery.inherit, stop=self._stopping
            )
        except Interrupted:
            return False  # stopped before Redis was ever reachable
        except LayoutMismatchError as exc:
            log.error("%s", exc)  # producers would queue where we never read: do not start
            self.exit_code = 2
            return False
        self.stages.engine_loop.start()
        subscribed = asyncio.Event()
        self._spawn_loop("publisher", self.stages.publisher.run())
        self._spawn_loop("heartbeat", self._heartbeat_loop())
        self._spawn_loop(
            "cancel listener",
            self.stages.reader.listen_cancels(
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
            "worker %s ready on %s%s (%s)",
            self.config.consumer,
            ", ".join(self.keys.request_streams[:3]),
            f" and {self.keys.shards - 1} more shards" if self.keys.shards > 1 else "",
            redact_url(cfg.redis_url),
        )
        return True

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
            await asyncio.wait_for(self.stages.publisher.wait_idle(), 5.0)

    async def _abandon(self, states: list[JobState]) -> None:
        """Leave unfinished jobs pending (not acked) and idle, for other workers to reclaim now."""
        if not states:
            return
        log.warning("drain timeout: leaving %d jobs pending for other workers", len(states))
        for state in states:
            state.mark_done()
            self.stages.engine_loop.abort(state.job.id)
            self.jobs.release(state)
        with contextlib.suppress(*_EXIT_ERRORS):
            await self.stages.recovery.release([s.ref for s in states])

    async def _shutdown(self) -> None:
        assert self._closing is not None
        self.supervisor.closing = True  # loops that end from here on are not deaths
        self._closing.set()
        # Bounded: redis-py can swallow a cancel that lands mid-command; the loops also
        # watch _closing, so they end on their own right after.
        await self.supervisor.stop(_TASK_EXIT_S)
        await asyncio.to_thread(self.stages.engine_loop.stop)
        self.stages.encoder.close()
        self.stages.reader.close()
        with contextlib.suppress(*_EXIT_ERRORS):
            await self.stages.recovery.leave()
        await self.redis.aclose()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        log.info("worker %s stopped: %s", self.config.consumer, self.stats())

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
            if self.stages.publisher.on_output(state, out):
                self.stages.engine_loop.abort(out.request_id, "stop")
        for request_id, error in event.failures:
            state = self.jobs.live(request_id)
            if state is not None:
                self.num_engine_failures += 1
                self.stages.publisher.fail(state, error)

    def _release(self, state: JobState) -> None:
        self.jobs.release(state)
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    # -- background loops -------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        assert self._closing is not None
        recovery = self.stages.recovery
        while not self._closing.is_set():
            try:
                await self.stages.retry.call(
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
        state.request_cancel()
        if state.running:
            # Frees its KV blocks at the engine's next inbox drain; the result goes out now.
            self.stages.engine_loop.abort(job_id, "abort")
            self.stages.publisher.final(state, STATUS_CANCELLED, "abort")
        # Not started yet: intake answers `cancelled` once tokenization returns.


async def _first_of(*events: asyncio.Event) -> None:
    """Return once any of `events` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
