"""Queue-layer benchmark (`headrace bench queue`): producer → Redis → worker → result, no model.

Workers are real `WorkerService` processes whose engine is the test engine of
`bench/queue_engine.py` (a fixed number of tokens at once), so what is measured is the
queue layer itself: Redis commands per job (INFO commandstats before and after, summed
over every node), Redis's own CPU time per job (INFO cpu), jobs/s, and the latency the queue adds (submit → final result, p50 and
p99; the engine adds nothing). One producer (`AsyncClient`) keeps `concurrency` jobs in
flight. Deployments: one node (embedded redis-server) and a local 3-primary cluster
(`bench/local_redis.py`, `shards` shards); 1, 2, 4 worker processes each.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import redis

from bench.local_redis import cluster_capable_server, start_cluster
from bench.queue_engine import TEST_ENGINE_NAME
from producer.client import AsyncClient
from worker.embedded import start_embedded_redis

_PROMPT = list(range(1000, 1016))  # 16 prompt tokens, no tokenization


@dataclass(frozen=True)
class QueueRun:
    """One (deployment, workers) cell of the table."""

    deployment: str
    workers: int
    jobs: int
    jobs_per_s: float
    p50_ms: float
    p99_ms: float
    commands_per_job: float
    redis_cpu_us_per_job: float  # Redis's own CPU time (user + sys, every node) per job


@dataclass(frozen=True)
class QueueBenchConfig:
    jobs: int = 2000
    tokens: int = 16
    concurrency: int = 64
    workers: tuple[int, ...] = (1, 2, 4)
    deployments: tuple[str, ...] = ("single", "cluster")
    shards: int = 3


def run_queue_bench(config: QueueBenchConfig) -> list[QueueRun]:
    runs = []
    for deployment in config.deployments:
        with _deployment(deployment, config.shards) as (url, nodes):
            for n in config.workers:
                runs.append(_run_cell(deployment, url, nodes, n, config))
    return runs


@contextlib.contextmanager
def _deployment(kind: str, shards: int) -> Iterator[tuple[str, list[int]]]:
    """(URL, ports of the nodes whose commands count) of a fresh deployment."""
    if kind == "single":
        with start_embedded_redis() as server:
            yield server.url, [server.port]
        return
    binary, why = cluster_capable_server()
    if binary is None:
        raise RuntimeError(f"cannot start a local cluster: {why}")
    with tempfile.TemporaryDirectory(prefix="headrace-bench-cluster-") as tmp:
        cluster = start_cluster(binary, Path(tmp))
        try:
            yield cluster.url(shards=shards), [n.port for n in cluster.primaries]
        finally:
            cluster.stop()


def _run_cell(
    deployment: str, url: str, nodes: list[int], n: int, cfg: QueueBenchConfig
) -> QueueRun:
    _flush(nodes)
    procs = [_spawn_worker(url, f"bench-{deployment}-{i}", cfg.tokens) for i in range(n)]
    try:
        _wait_workers(nodes, url, n, procs)
        asyncio.run(_produce(url, min(100, cfg.jobs), cfg))  # warm-up: connections, scripts
        before, cpu_before = _command_calls(nodes), _redis_cpu_s(nodes)
        start = time.perf_counter()
        latencies = asyncio.run(_produce(url, cfg.jobs, cfg))
        wall = time.perf_counter() - start
        after, cpu_after = _command_calls(nodes), _redis_cpu_s(nodes)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    ms = np.array(latencies) * 1000
    return QueueRun(
        deployment=deployment,
        workers=n,
        jobs=cfg.jobs,
        jobs_per_s=round(cfg.jobs / wall, 1),
        p50_ms=round(float(np.percentile(ms, 50)), 2),
        p99_ms=round(float(np.percentile(ms, 99)), 2),
        commands_per_job=round((after - before) / cfg.jobs, 2),
        redis_cpu_us_per_job=round((cpu_after - cpu_before) / cfg.jobs * 1e6, 1),
    )


async def _produce(url: str, jobs: int, cfg: QueueBenchConfig) -> list[float]:
    """Submit `jobs` jobs keeping `concurrency` in flight; each one's submit → result time."""
    latencies: list[float] = []
    params = {"max_tokens": cfg.tokens, "ignore_eos": True, "temperature": 0.0}
    async with AsyncClient(url) as client:
        todo = iter(range(jobs))

        async def lane() -> None:
            for _ in todo:
                start = time.perf_counter()
                job_id = await client.submit(prompt_token_ids=_PROMPT, params=params)
                result = await client.result(job_id, timeout=120)
                if result.status != "ok":
                    raise RuntimeError(f"job {job_id}: {result.status} {result.error}")
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(lane() for _ in range(cfg.concurrency)))
    return latencies


def _spawn_worker(url: str, consumer: str, tokens: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "bench.queue_engine", url, consumer, str(tokens)]
    root = Path(__file__).resolve().parent.parent
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_workers(nodes: list[int], url: str, n: int, procs: list[subprocess.Popen[bytes]]) -> None:
    """Until `n` workers have written their first heartbeat (namespace-wide hash)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a benchmark worker exited during start-up")
        count = 0
        for port in nodes:
            with redis.Redis(port=port) as node, contextlib.suppress(redis.ResponseError):
                count += int(node.hlen("headrace:workers"))  # MOVED elsewhere: suppressed
        if count >= n:
            return
        time.sleep(0.1)
    raise RuntimeError("benchmark workers did not start")


def _flush(nodes: list[int]) -> None:
    for port in nodes:
        with redis.Redis(port=port) as node:
            node.flushall()
            node.config_resetstat()


def _command_calls(nodes: list[int]) -> int:
    """Commands served so far by every node (INFO commandstats), less the INFO calls."""
    total = 0
    for port in nodes:
        with redis.Redis(port=port) as node:
            stats = node.info("commandstats")
        total += sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")
    return total


def _redis_cpu_s(nodes: list[int]) -> float:
    """CPU seconds (user + sys) every node's server process has used so far."""
    total = 0.0
    for port in nodes:
        with redis.Redis(port=port) as node:
            cpu = node.info("cpu")
        total += float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    return total


def render(runs: list[QueueRun], cfg: QueueBenchConfig) -> str:
    lines = [
        f"headrace bench queue: {cfg.jobs} jobs, {cfg.tokens} tokens each, {cfg.concurrency} in "
        f"flight; engine: {TEST_ENGINE_NAME}",
        "| deployment | workers | jobs/s | p50 ms | p99 ms | Redis commands / job "
        "| Redis CPU µs / job |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        where = "1 node" if r.deployment == "single" else f"3-primary cluster, {cfg.shards} shards"
        lines.append(
            f"| {where} | {r.workers} | {r.jobs_per_s:.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} "
            f"| {r.commands_per_job:.1f} | {r.redis_cpu_us_per_job:.0f} |"
        )
    return "\n".join(lines)


def as_dicts(runs: list[QueueRun]) -> list[dict[str, object]]:
    return [asdict(r) for r in runs]
