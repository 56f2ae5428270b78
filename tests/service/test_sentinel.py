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
from producer.bulk import BulkConfig, run_bulk
from producer.bulk_watch import WatchConfig
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
