"""Observability (all stages): Prometheus metrics, /healthz and /readyz, the periodic throughput line.

One `Metrics` per worker owns a private CollectorRegistry (never prometheus_client's
global one, so several workers in one process — tests, notebooks — cannot collide).
The event loop feeds it results and token counts, the engine thread feeds it
engine stats after each step; prometheus_client's metrics are thread-safe. The HTTP
server runs in its own daemon thread, so a scrape never waits on the event loop —
but /healthz reads the loop's last beat, so a stuck loop does fail the probe.

NOTE: ~420 lines: the metric definitions are one table each reader of /metrics looks up;
splitting the HTTP server off would leave two halves of one small feature.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from worker.keys import LEVEL_NAMES, priority_level
from worker.protocol import Result

log = logging.getLogger(__name__)

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5)
# Batch jobs can sit queued for a long time: buckets go up to an hour.
_LONG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


@dataclass(frozen=True)
class _Sample:
    """Running totals at one instant (monotonic seconds), for rates over a window."""

    time: float
    generation_tokens: int
    prompt_tokens: int
    requests: int


def _rates(old: _Sample, new: _Sample) -> tuple[float, float, float]:
    """(generation tok/s, prompt tok/s, requests/s) between two samples."""
    span = new.time - old.time
    if span <= 0:
        return 0.0, 0.0, 0.0
    return (
        (new.generation_tokens - old.generation_tokens) / span,
        (new.prompt_tokens - old.prompt_tokens) / span,
        (new.requests - old.requests) / span,
    )


class Metrics:
    """The worker's Prometheus metrics plus plain running totals for logs and `headrace stats`.

    rate_window_s: how far back the "recent" rates in `snapshot()` look.
    """

    def __init__(self, rate_window_s: float = 60.0) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.ttft = Histogram(
            "headrace_time_to_first_token_seconds",
            "Enqueue (stream entry time) to first generated token",
            buckets=_TTFT_BUCKETS,
            registry=reg,
        )
        self.tpot = Histogram(
            "headrace_time_per_output_token_seconds",
            "Mean time between output tokens after the first, per request",
            buckets=_TPOT_BUCKETS,
            registry=reg,
        )
        self.e2e = Histogram(
            "headrace_e2e_request_latency_seconds",
            "Enqueue to final result",
            buckets=_LONG_BUCKETS,
            registry=reg,
        )
        self.queue_wait = Histogram(
            "headrace_request_queue_time_seconds",
            "Enqueue to hand-off to the engine (stream wait + tokenization)",
            buckets=_LONG_BUCKETS,
            registry=reg,
        )
        self.priority_wait = Histogram(
            "headrace_priority_queue_wait_seconds",
            "Enqueue to the job's first engine output (the end of its admission step when its "
            "prompt fits one step), by priority level: high, default or low",
            ["priority"],
            buckets=_LONG_BUCKETS,
            registry=reg,
        )
        self.requests = Counter(
            "headrace_requests", "Final results by status", ["status"], registry=reg
        )
        self.prompt_tokens = Counter(
            "headrace_prompt_tokens", "Prompt tokens handed to the engine", registry=reg
        )
        self.generation_tokens = Counter(
            "headrace_generation_tokens", "Tokens generated", registry=reg
        )
        self.steps = Counter("headrace_engine_steps", "Engine forward passes", registry=reg)
        self.preemptions = Counter(
            "headrace_preemptions", "Sequences preempted for lack of KV blocks", registry=reg
        )
        self.recomputed_tokens = Counter(
            "headrace_recomputed_tokens",
            "Tokens prefilled again when preempted sequences resumed (the work preemption wasted)",
            registry=reg,
        )
        self.prefix_queries = Counter(
            "headrace_prefix_cache_query_tokens",
            "Tokens to prefill at admission (prompt, plus output so far for a resumed sequence)",
            registry=reg,
        )
        self.prefix_hits = Counter(
            "headrace_prefix_cache_hit_tokens",
            "Of the prefix cache's query tokens, those found in cached KV pages",
            registry=reg,
        )
        self.prefix_hit_ratio = Gauge(
            "headrace_prefix_cache_hit_ratio",
            "Prompt tokens served from the prefix cache / prompt tokens, since start",
            registry=reg,
        )
        self.running = Gauge("headrace_num_requests_running", "Sequences running", registry=reg)
        self.waiting = Gauge("headrace_num_requests_waiting", "Sequences waiting", registry=reg)
        self.inflight = Gauge(
            "headrace_jobs_inflight", "Jobs read from Redis and not yet acked", registry=reg
        )
        self.kv_used = Gauge("headrace_kv_blocks_used", "KV cache blocks in use", registry=reg)
        self.kv_free = Gauge("headrace_kv_blocks_free", "KV cache blocks free", registry=reg)
        self.step_tokens = Gauge(
            "headrace_step_tokens",
            "Tokens (prefill + decode) in the last engine step's forward pass",
            registry=reg,
        )
        # Plain totals, written on the event loop thread only.
        self.total_generation_tokens = 0
        self.total_prompt_tokens = 0
        self.total_requests = 0
        self._engine: Any = None  # last EngineStats (one reference swap: safe across threads)
        self._preemptions_seen = 0
        self._recomputed_seen = 0
        self._prefix_seen = (0, 0)  # (queries, hits)
        self._window_s = rate_window_s
        self._samples: deque[_Sample] = deque()
        self._last_log = self._sample()

    # -- event loop side -------------------------------------------------------------

    def add_prompt_tokens(self, n: int) -> None:
        self.prompt_tokens.inc(n)
        self.total_prompt_tokens += n

    def add_generation_tokens(self, n: int) -> None:
        self.generation_tokens.inc(n)
        self.total_generation_tokens += n

    def observe_priority_wait(self, priority: int, seconds: float) -> None:
        """Record how long a job of `priority` waited for the engine to take it."""
        self.priority_wait.labels(LEVEL_NAMES[priority_level(priority)]).observe(seconds)

    def observe_result(self, result: Result) -> None:
        """Count one final result and record its latencies (from `result.timings`, in ms)."""
        self.requests.labels(result.status).inc()
        self.total_requests += 1
        timings = result.timings or {}
        total, ttft, queued = (timings.get(k) for k in ("total_ms", "ttft_ms", "queued_ms"))
        completion = int((result.usage or {}).get("completion_tokens", 0))
        if total is not None:
            self.e2e.observe(total / 1000)
        if queued is not None:
            self.queue_wait.observe(queued / 1000)
        if ttft is not None:
            self.ttft.observe(ttft / 1000)
            if total is not None and completion > 1:
                self.tpot.observe(max(0.0, total - ttft) / 1000 / (completion - 1))
        log.debug(
            "job %s %s finish=%s prompt=%s completion=%d e2e_ms=%s ttft_ms=%s queued_ms=%s",
            result.id,
            result.status,
            result.finish_reason or (result.error or {}).get("code"),
            (result.usage or {}).get("prompt_tokens", 0),
            completion,
            total,
            ttft,
            queued,
        )

    def tick(self, inflight: int) -> None:
        """Record a totals sample for the recent rates and set the in-flight gauge."""
        self.inflight.set(inflight)
        now = self._sample()
        self._samples.append(now)
        while self._samples and now.time - self._samples[0].time > self._window_s:
            self._samples.popleft()

    def snapshot(self) -> dict[str, Any]:
        """Totals, recent rates and engine occupancy, for the per-worker stats hash."""
        gen, prompt, req = _rates(self._samples[0], self._sample()) if self._samples else (0, 0, 0)
        out: dict[str, Any] = {
            "finished": self.total_requests,
            "prompt_tokens": self.total_prompt_tokens,
            "generation_tokens": self.total_generation_tokens,
            "recent_tok_s": round(gen, 2),
            "recent_prompt_tok_s": round(prompt, 2),
            "recent_req_s": round(req, 3),
        }
        stats = self._engine
        if stats is not None:
            out.update(
                running=stats.num_running,
                waiting=stats.num_waiting,
                kv_used_blocks=stats.num_total_blocks - stats.num_free_blocks,
                kv_total_blocks=stats.num_total_blocks,
                prefix_cache_queries=stats.prefix_cache_queries,
                prefix_cache_hits=stats.prefix_cache_hits,
                prefix_cache_hit_ratio=round(stats.prefix_cache_hit_ratio, 4),
            )
        return out

    def throughput_line(self) -> str | None:
        """One INFO line of rates since the previous call; None when nothing happened."""
        now = self._sample()
        old, self._last_log = self._last_log, now
        stats = self._engine
        busy = stats is not None and (stats.num_running or stats.num_waiting)
        idle = (now.requests, now.generation_tokens) == (old.requests, old.generation_tokens)
        if idle and not busy:
            return None
        gen, prompt, req = _rates(old, now)
        line = f"throughput: {gen:.1f} tok/s generated, {prompt:.1f} tok/s prompt, {req:.2f} req/s"
        if stats is not None:
            used = stats.num_total_blocks - stats.num_free_blocks
            share = 100 * used / max(1, stats.num_total_blocks)
            line += (
                f"; running {stats.num_running}, waiting {stats.num_waiting}; "
                f"KV {share:.0f}% used ({used}/{stats.num_total_blocks} blocks)"
            )
        return line

    def _sample(self) -> _Sample:
        return _Sample(
            time.monotonic(),
            self.total_generation_tokens,
            self.total_prompt_tokens,
            self.total_requests,
        )

    # -- engine thread side ----------------------------------------------------------

    def observe_step(self, stats: Any) -> None:
        """After one engine step: occupancy gauges from `Engine.stats()` (EngineStats)."""
        self.steps.inc()
        self.step_tokens.set(stats.num_batched_tokens)
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_free.set(stats.num_free_blocks)
        self.kv_used.set(stats.num_total_blocks - stats.num_free_blocks)
        if stats.num_preemptions > self._preemptions_seen:
            self.preemptions.inc(stats.num_preemptions - self._preemptions_seen)
            self._preemptions_seen = stats.num_preemptions
        if stats.num_recomputed_tokens > self._recomputed_seen:
            self.recomputed_tokens.inc(stats.num_recomputed_tokens - self._recomputed_seen)
            self._recomputed_seen = stats.num_recomputed_tokens
        queries, hits = self._prefix_seen
        self.prefix_queries.inc(stats.prefix_cache_queries - queries)
        self.prefix_hits.inc(stats.prefix_cache_hits - hits)
        self._prefix_seen = (stats.prefix_cache_queries, stats.prefix_cache_hits)
        self.prefix_hit_ratio.set(stats.prefix_cache_hit_ratio)
        self._engine = stats


class Health:
    """Liveness and readiness facts: written by the service, read by the HTTP thread.

    stale_after_s: a loop beat or Redis ping older than this counts as failed.
    Not live while the loop is stuck or any background task died (the worker is then
    on its way out with a non-zero exit code).
    """

    def __init__(self, stale_after_s: float = 10.0) -> None:
        self.stale_after_s = stale_after_s
        self.model_loaded = False
        self.stopping = False
        self._beat = time.monotonic()
        self._redis_ok_at: float | None = None
        # Replaced, never mutated: the HTTP thread reads it without a lock.
        self.dead_tasks: frozenset[str] = frozenset()

    def beat(self) -> None:
        self._beat = time.monotonic()

    def redis_reachable(self, ok: bool) -> None:
        self._redis_ok_at = time.monotonic() if ok else None

    def task_died(self, name: str) -> None:
        self.dead_tasks = self.dead_tasks | {name}

    def live(self) -> tuple[bool, dict[str, Any]]:
        lag = time.monotonic() - self._beat
        dead = self.dead_tasks
        body = {"loop_beat_age_s": round(lag, 3), "dead_tasks": sorted(dead)}
        return lag < self.stale_after_s and not dead, body

    def ready(self) -> tuple[bool, dict[str, Any]]:
        at = self._redis_ok_at
        redis_ok = at is not None and time.monotonic() - at < self.stale_after_s
        live, _ = self.live()
        body = {
            "model_loaded": self.model_loaded,
            "redis": redis_ok,
            "loop": live,
            "stopping": self.stopping,
        }
        return self.model_loaded and redis_ok and live and not self.stopping, body


async def monitor(
    metrics: Metrics,
    health: Health,
    ping: Callable[[], Awaitable[Any]],
    inflight: Callable[[], int],
    closing: asyncio.Event,
    *,
    interval_s: float = 1.0,
    log_every_s: float = 10.0,
) -> None:
    """Until `closing`: beat the loop, ping Redis, sample totals, log throughput every so often."""
    next_log = time.monotonic() + log_every_s
    while not closing.is_set():
        health.beat()
        try:
            await asyncio.wait_for(ping(), timeout=max(interval_s, 2.0))
            health.redis_reachable(True)
        except Exception as exc:  # any failure means "not reachable"; the reason goes to debug
            log.debug("redis ping failed: %r", exc)
            health.redis_reachable(False)
        metrics.tick(inflight())
        if time.monotonic() >= next_log:
            next_log = time.monotonic() + log_every_s
            line = metrics.throughput_line()
            if line is not None:
                log.info(line)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(closing.wait(), interval_s)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up shutdown
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        pass  # one line per scrape would drown the worker's own logs


class MetricsServer:
    """HTTP in a daemon thread: GET /metrics (Prometheus text), /healthz, /readyz (JSON, 200/503).

    port 0 picks a free port (see `.port` after `start()`).
    """

    def __init__(self, metrics: Metrics, health: Health, host: str = "0.0.0.0", port: int = 0):
        self._metrics_app = make_wsgi_app(metrics.registry)
        self._health = health
        self._host, self._port = host, port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_port if self._server is not None else self._port

    def start(self) -> MetricsServer:
        self._server = make_server(
            self._host, self._port, self._app, _ThreadingServer, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="headrace-metrics", daemon=True
        )
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics (/healthz, /readyz)", self._host, self.port)
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = None

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        if path in ("/healthz", "/readyz"):
            ok, body = self._health.live() if path == "/healthz" else self._health.ready()
            payload = json.dumps({"ok": ok, **body}).encode()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [payload]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]
