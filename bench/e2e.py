"""End-to-end benchmark: producer → Redis → worker → results against the engine alone, one run.

The engine alone is stepped in this process; the service path is a real `headrace
worker` process (same engine flags) on an embedded Redis, fed by an AsyncClient
that submits the whole workload at t=0. The difference is what the service layer
(ingest, tokenize, publish, Redis round trips, a second process) costs.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
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


def run_via_redis(worker_args: list[str], workload: Workload) -> tuple[RunResult, float]:
    """`headrace worker <worker_args>` on an embedded Redis; every job submitted at t=0.

    TTFT here includes queueing: the worker measures it from the job's enqueue time.
    Returns the run and the median queue wait in ms.
    """
    from worker.embedded import start_embedded_redis

    with start_embedded_redis() as redis_server:
        cmd = [sys.executable, "-m", "worker.cli", "worker", "--redis-url", redis_server.url]
        worker = subprocess.Popen([*cmd, *worker_args], stdout=subprocess.DEVNULL)
        try:
            asyncio.run(_wait_ready(redis_server.url, worker))
            return asyncio.run(_submit_all(redis_server.url, workload))
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)


async def _wait_ready(redis_url: str, worker: subprocess.Popen[bytes]) -> None:
    """Until the worker's first heartbeat (it is reading by then)."""
    import redis.asyncio as aioredis

    from worker.keys import Keys

    keys = Keys()
    client = aioredis.Redis.from_url(redis_url)
    try:
        while worker.poll() is None:
            if await client.hlen(keys.workers):
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"the worker exited with {worker.returncode}")
    finally:
        await client.aclose()


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


def run_e2e(engine: Engine, worker_args: list[str], workload: Workload) -> E2EReport:
    alone = run_engine(engine, workload)
    via_redis, queued = run_via_redis(worker_args, workload)
    return E2EReport(alone, via_redis, queued)
