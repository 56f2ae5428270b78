"""Sentinel failover under load: a primary killed mid-run is replaced and every job ends with one
final result (worker and `headrace bulk` reconnect through the sentinels; jobs the replica never
received are resubmitted by the bulk's lost-job watch).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from pathlib import Path

import pytest

from bench.local_redis import LocalSentinels, start_sentinels
from producer import AsyncClient, JobLostError
from producer.bulk import BulkConfig, run_bulk
from producer.lost_jobs import WatchConfig
from tests.redis_fixtures import deployment_server
from tests.worker_harness import InProcessWorker, wait_for, worker_config
from worker.cli.stats import collect
from worker.keys import Keys
from worker.redis_url import connect

pytestmark = pytest.mark.slow

PARAMS = {"max_tokens": 16, "ignore_eos": True, "temperature": 0.0}
QUICK_WATCH = WatchConfig(check_s=0.2, lost_after_s=2.0, redis_down_s=60.0)


@pytest.fixture
def sentinels(tmp_path: Path):
    deployment = start_sentinels(deployment_server(), tmp_path / "sentinel")
    try:
        yield deployment
    finally:
        deployment.stop()


def test_primary_killed_mid_run_every_job_answered_once(
    engine, sentinels: LocalSentinels, tmp_path: Path
) -> None:
    ids = [f"f{i:02d}" for i in range(40)]
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        "".join(json.dumps({"id": i, "prompt": i, "params": PARAMS}) + "\n" for i in ids)
    )
    out = tmp_path / "out.jsonl"
    config = BulkConfig(
        inp, out, redis_url=sentinels.url, window=8, progress=False, watch=QUICK_WATCH
    )
    old_primary = sentinels.primary.port
    # max_inflight 2: most of the window waits in the stream when the primary dies.
    worker_cfg = worker_config(sentinels.url, engine.config, max_inflight=2, redis_timeout_s=2.0)
    with InProcessWorker(worker_cfg, engine) as worker:

        def kill_midway() -> None:
            wait_for(lambda: _lines(out) >= 6, 120, "6 lines")
            sentinels.primary.kill()

        killer = threading.Thread(target=kill_midway, daemon=True)
        killer.start()
        summary = asyncio.run(run_bulk(config))
        killer.join(5)
        assert worker.service.exit_code == 0
        assert worker.stop() == 0
    assert sentinels.current_primary_port() == sentinels.replica.port != old_primary
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    counts = Counter(line["id"] for line in lines)
    assert sorted(counts) == ids and set(counts.values()) == {1}, counts
    assert all(line["usage"]["completion_tokens"] == 16 for line in lines), lines
    assert summary.requests == len(ids) and summary.errors == 0
    client = connect(sentinels.url)  # `headrace stats` and the sync clients find it too
    try:
        stats = collect(client, Keys())
    finally:
        client.close()
    assert stats.length == stats.pending == 0 and stats.dead_letter == 0


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_primary_killed_under_a_client_every_job_answered_or_reported_lost(
    engine, sentinels: LocalSentinels
) -> None:
    """A plain client (no bulk watch): each job waited on without a timeout either gets its
    result or fails with JobLostError, counted in `lost_jobs`; none waits forever. Lost ones
    submitted again under their ids are answered."""
    worker_cfg = worker_config(sentinels.url, engine.config, max_inflight=2, redis_timeout_s=2.0)

    async def main(worker: InProcessWorker) -> None:
        async with AsyncClient(sentinels.url, lost_check_s=0.2) as client:
            jobs = [{"id": f"c{i:02d}", "prompt": f"c{i}", "params": PARAMS} for i in range(40)]
            await client.submit_many(jobs)
            waits = {job["id"]: asyncio.create_task(client.result(job["id"])) for job in jobs}
            while sum(w.done() for w in waits.values()) < 6:
                await asyncio.sleep(0.05)
            sentinels.primary.kill()
            done, pending = await asyncio.wait(waits.values(), timeout=180)
            assert not pending, f"{len(pending)} jobs still waited on"
            lost = [i for i, w in waits.items() if isinstance(w.exception(), JobLostError)]
            answered = [i for i, w in waits.items() if w.exception() is None]
            assert len(lost) + len(answered) == len(jobs), [w.exception() for w in done]
            assert client.lost_jobs == len(lost)
            assert all(waits[i].result().usage["completion_tokens"] == 16 for i in answered)
            await client.submit_many(job for job in jobs if job["id"] in lost)
            for job_id in lost:
                assert (await client.result(job_id, timeout=120)).status == "ok"

    with InProcessWorker(worker_cfg, engine) as worker:
        asyncio.run(main(worker))
        assert worker.stop() == 0
    assert sentinels.current_primary_port() == sentinels.replica.port
