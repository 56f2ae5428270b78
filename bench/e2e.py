"""End-to-end benchmark: producer → Redis → worker → results against the engine alone, one run.

Both sides use the same Engine object and workload; the engine alone is stepped
from a background thread, as the worker's engine thread does, so the difference
is what the service layer (ingest, publish, Redis round trips) costs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bench.throughput import RunResult, run_engine
from bench.workloads import Workload

if TYPE_CHECKING:
    from worker.engine.engine import Engine


@dataclass(frozen=True)
class E2EReport:
    engine_alone: RunResult
    via_redis: RunResult
    queued_ms_p50: float

    @property
    def overhead(self) -> float:
        """Fraction of the engine's throughput lost end to end (negative: within noise)."""
        return 1.0 - self.via_redis.tokens_per_s / self.engine_alone.tokens_per_s

    def to_dict(self) -> dict[str, object]:
        return {
            "engine_alone": self.engine_alone.to_dict(),
            "via_redis": self.via_redis.to_dict(),
            "queued_ms_p50": self.queued_ms_p50,
            "overhead": self.overhead,
        }


def run_engine_in_thread(engine: Engine, workload: Workload) -> RunResult:
    box: dict[str, RunResult] = {}
    thread = threading.Thread(target=lambda: box.update(r=run_engine(engine, workload)))
    thread.start()
    thread.join()
    return box["r"]


def run_via_redis(engine: Engine, workload: Workload) -> tuple[RunResult, float]:
    """One worker (sharing `engine`) on an embedded Redis; a client submits every job at t=0.

    TTFT here includes queueing: it is measured by the worker from the job's
    enqueue time. Returns the run and the median queue wait in ms.
    """
    from worker.embedded import start_embedded_redis
    from worker.service import WorkerService
    from worker.service_cli import run_event_loop
    from worker.settings import WorkerConfig

    with start_embedded_redis() as redis_server:
        service = WorkerService(
            WorkerConfig(engine=engine.config, redis_url=redis_server.url), engine
        )
        thread = threading.Thread(target=lambda: run_event_loop(service.run()), daemon=True)
        thread.start()
        if not service.ready.wait(60):
            raise RuntimeError("the worker did not start")
        try:
            return asyncio.run(_submit_all(redis_server.url, workload))
        finally:
            service.request_stop()
            thread.join(60)


async def _submit_all(redis_url: str, workload: Workload) -> tuple[RunResult, float]:
    from producer.client import AsyncClient

    items = [
        {
            "prompt_token_ids": list(r.prompt_token_ids),
            "params": {"max_tokens": r.output_len, "temperature": 0.0, "ignore_eos": True},
        }
        for r in workload.requests
    ]
    async with AsyncClient(redis_url) as client:
        start = time.perf_counter()
        ids = await client.submit_many(items)
        results = await asyncio.gather(*(client.result(i, timeout=3600) for i in ids))
        elapsed = time.perf_counter() - start
    bad = [r for r in results if r.status != "ok"]
    if bad:
        raise RuntimeError(f"{len(bad)} jobs failed, e.g. {bad[0].error}")
    tokens = sum(r.usage["completion_tokens"] for r in results)
    ttft = tuple(r.timings["ttft_ms"] / 1000 for r in results)
    tpot = tuple(
        (r.timings["total_ms"] - r.timings["ttft_ms"]) / 1000 / (r.usage["completion_tokens"] - 1)
        for r in results
        if r.usage["completion_tokens"] > 1
    )
    queued = float(np.percentile([r.timings.get("queued_ms", 0.0) for r in results], 50))
    return RunResult(tokens, elapsed, ttft, tpot), queued


def run_e2e(engine: Engine, workload: Workload) -> E2EReport:
    alone = run_engine_in_thread(engine, workload)
    via_redis, queued = run_via_redis(engine, workload)
    return E2EReport(alone, via_redis, queued)
