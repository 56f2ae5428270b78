"""The service sharded (4 shards) on a 3-primary Redis Cluster (plain and TLS) and on one node:
submit/result, cancel, reclaim after kill -9, a SIGTERM drain, dead letter, bulk resume, a
layout mismatch refused, a primary failover.

Entries are routed as producers route them (`Keys.job_stream`), results read from each
shard's reply stream, so every check also proves that no script crossed a slot.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bench.local_redis import start_cluster
from producer.bulk import BulkConfig, run_bulk
from producer.lost_jobs import WatchConfig
from producer.sync import Client
from tests.redis_fixtures import deployment_server
from tests.worker_harness import (
    REPO_ROOT,
    InProcessWorker,
    consumer_alive,
    spawn_worker,
    wait_for,
    worker_config,
)
from worker.cli import main
from worker.cli.stats import collect
from worker.keys import JOB_FIELD, RESULT_FIELD, Keys
from worker.layout import LayoutMismatchError
from worker.protocol import Job, Result, decode_result, encode_job
from worker.redis_url import connect, parse_url
from worker.service.run import run_event_loop
from worker.service.worker import WorkerService

CLIENT = "test"
LONG = {"max_tokens": 400, "ignore_eos": True, "temperature": 0.0}


@pytest.fixture(params=["cluster", "tls cluster", "one node"])
def url(request: pytest.FixtureRequest) -> str:
    """The 3-primary cluster (plain, or over TLS: `rediss+cluster://`), or one node sharded
    the same way (`?shards=4`): all flushed."""
    if request.param == "cluster":
        return request.getfixturevalue("cluster_url")
    if request.param == "tls cluster":
        return request.getfixturevalue("tls_cluster_url")
    return request.getfixturevalue("redis_url") + "?shards=4"


@pytest.fixture
def keys(url: str) -> Keys:
    return parse_url(url).keys("headrace")


@pytest.fixture
def client(url: str, keys: Keys) -> Any:
    conn = connect(url)
    for stream in keys.request_streams:  # before any worker: no entry is ever missed
        conn.xgroup_create(stream, keys.group, id="0", mkstream=True)
    yield conn
    conn.close()


def job(keys: Keys, job_id: str, prompt: str = "Hello", **params: Any) -> Job:
    stream = bool(params.pop("stream", False))
    reply_to = keys.reply(CLIENT, keys.shard_of(job_id))
    return Job(id=job_id, reply_to=reply_to, prompt=prompt, params=params, stream=stream)


def push(client: Any, keys: Keys, jobs: list[Job], stream: str | None = None) -> dict[str, str]:
    """XADD each job to the stream its id routes to (or `stream`); job id → entry id."""
    return {
        j.id: client.xadd(
            stream or keys.job_stream(j.id, j.priority), {JOB_FIELD: encode_job(j)}
        ).decode()
        for j in jobs
    }


def finals(client: Any, keys: Keys) -> dict[str, list[Result]]:
    """Final results per job id on the test client's reply streams (all shards)."""
    out: dict[str, list[Result]] = {}
    for stream in keys.replies(CLIENT):
        for _, fields in client.xrange(stream):
            result = decode_result(fields[RESULT_FIELD.encode()])
            if result.final:
                out.setdefault(result.id, []).append(result)
    return out


def pending(client: Any, keys: Keys, consumer: str | None = None) -> int:
    if consumer is None:
        return sum(int(client.xpending(s, keys.group)["pending"]) for s in keys.request_streams)
    return sum(
        len(client.xpending_range(s, keys.group, "-", "+", 1000, consumername=consumer))
        for s in keys.request_streams
    )


def busy_worker(
    url: str,
    model_dir: Path,
    client: Any,
    keys: Keys,
    tmp_path: Path,
    name: str,
    jobs: list[Job],
    holding: int,
    *flags: str,
) -> subprocess.Popen[bytes]:
    """A `headrace worker` process (consumer `name`, log in tmp_path), up, given `jobs`, and
    generating at least `holding` of them."""
    log = tmp_path / f"{name}.log"
    proc = spawn_worker(url, model_dir, log, "--consumer", name, *flags)
    try:
        wait_for(lambda: consumer_alive(client, name) or proc.poll() is not None, 90, "up")
        assert proc.poll() is None, log.read_text()
        push(client, keys, jobs)
        wait_for(lambda: pending(client, keys, name) >= holding, 60, f"{name} holding jobs")
        time.sleep(1.0)  # generating
    except BaseException:
        proc.kill()
        raise
    return proc


def spread(keys: Keys, prefix: str, n: int) -> list[str]:
    ids = [f"{prefix}{i}" for i in range(n)]
    assert len({keys.shard_of(i) for i in ids}) >= 3, "the ids must land on several shards"
    return ids


def test_submit_result_stream_cancel_and_stats(engine, url, client, keys):
    ids = spread(keys, "c", 8)
    greedy = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}
    with (
        InProcessWorker(worker_config(url, engine.config), engine) as worker,
        Client(url) as producer,
    ):
        for job_id in ids:
            producer.submit(f"Prompt {job_id}", id=job_id, **greedy)
        got = {job_id: producer.result(job_id, timeout=60) for job_id in ids}
        assert all(r.status == "ok" and r.usage["completion_tokens"] == 6 for r in got.values())
        for job_id in ids:  # stored in the shard its id routes to
            assert decode_result(client.get(keys.result(job_id))).status == "ok"
        # A resubmitted id lands where the first one did: nothing queued, the same result.
        assert producer.generate("again", id=ids[0], timeout=30).reused

        streamed = producer.submit("Stream me", id="s1", stream=True, max_tokens=8, ignore_eos=True)
        items = list(producer.stream(streamed, timeout=60))
        assert "".join(r.delta for r in items[:-1]) == items[-1].text and items[-1].final

        long_id = producer.submit("Go on", id="long", stream=True, max_tokens=1000, ignore_eos=True)
        stream = producer.stream(long_id, timeout=60)
        assert next(stream).status == "partial"
        producer.cancel(long_id)
        final = [r for r in stream if r.final][0]
        assert final.status == "cancelled" and 0 < final.usage["completion_tokens"] < 1000
        producer.cancel("early")
        early = producer.result(producer.submit("Never run", id="early"), timeout=60)
        assert early.status == "cancelled" and early.usage["completion_tokens"] == 0
        wait_for(lambda: pending(client, keys) == 0, 10, "every entry acked")
        stats = collect(client, keys)
        assert stats.shards == 4 and stats.length == 0 and stats.pending == 0
        assert stats.live_workers == 1 and stats.dead_letter == 0
        assert worker.stop() == 0
    assert client.get(keys.layout) == b"4t"


def test_dead_letter_and_misrouted_jobs_stay_in_their_shard(engine, url, client, keys):
    poison, retry, other = job(keys, "poison", "Boom"), job(keys, "retry", "Again"), job(keys, "n")
    entries = push(client, keys, [poison, retry, other])
    for j in (poison, retry):  # consumers that died holding them
        stream = keys.job_stream(j.id, 0)
        client.xreadgroup(keys.group, "dead-1", {stream: ">"}, count=10)
    for name in ("dead-2", "dead-3"):
        client.xclaim(keys.job_stream("poison", 0), keys.group, name, 0, [entries["poison"]])
    # A producer that routed by another rule: refused unanswered, dead-lettered where it sits.
    wrong = next(s for s in keys.all_shards if s != keys.shard_of("stray"))
    [stray_entry] = push(
        client, keys, [job(keys, "stray")], stream=keys.request_stream(0, wrong)
    ).values()
    time.sleep(0.25)

    config = worker_config(url, engine.config, burst=True, claim_idle_ms=200, max_attempts=3)
    with InProcessWorker(config, engine) as worker:
        assert worker.join() == 0
    got = {k: v for k, v in finals(client, keys).items()}
    assert {k: len(v) for k, v in got.items()} == {"poison": 1, "retry": 1, "n": 1}
    assert (got["poison"][0].error_code, got["poison"][0].attempt) == ("max_attempts_exceeded", 4)
    assert (got["retry"][0].status, got["retry"][0].attempt) == ("ok", 2)
    [(_, dead)] = client.xrange(keys.dead_letter_of(keys.shard_of("poison")))
    assert dead[b"entry_id"].decode() == entries["poison"] and dead[b"attempts"] == b"4"
    [(_, stray)] = client.xrange(keys.dead_letter_of(wrong))
    assert stray[b"entry_id"].decode() == stray_entry and stray[b"code"] == b"invalid_request"
    assert worker.service.num_dead_lettered == 2 and pending(client, keys) == 0


def test_a_worker_or_client_with_another_shard_count_is_refused(engine, url, client, keys):
    with Client(url):
        pass  # records 4 shards
    other = url.replace("shards=4", "shards=2")
    with pytest.raises(LayoutMismatchError):
        Client(other).close()
    service = WorkerService(worker_config(other, engine.config, burst=True), engine)
    assert run_event_loop(service.run()) == 2
    assert client.get(keys.layout) == b"4t"


@pytest.mark.slow
@pytest.mark.parametrize("url", ["cluster", "one node"], indirect=True)  # TLS: bulk covers it
def test_kill9_mid_generation_every_job_completes_once_elsewhere(
    model_dir, engine, url, client, keys, tmp_path
):
    ids = spread(keys, "k", 8)
    jobs = [job(keys, i, f"Story {i}", stream=True, **LONG) for i in ids]
    flags = ("--max-inflight", "4", "--max-num-seqs", "4", "--claim-idle-ms", "1000")
    victim = busy_worker(url, model_dir, client, keys, tmp_path, "victim", jobs, 4, *flags)
    try:
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    finally:
        victim.kill()
    orphaned = pending(client, keys, "victim")
    assert orphaned and not finals(client, keys)

    config = worker_config(url, engine.config, claim_idle_ms=1000)
    with InProcessWorker(config, engine) as rescuer:
        wait_for(lambda: len(finals(client, keys)) == 8, 120, "all jobs done")
        assert rescuer.stop() == 0
    got = finals(client, keys)
    assert {k: len(v) for k, v in got.items()} == dict.fromkeys(ids, 1)
    assert all(v[0].status == "ok" and v[0].usage["completion_tokens"] == 400 for v in got.values())
    assert sum(v[0].attempt == 2 for v in got.values()) == orphaned
    assert rescuer.service.recovery.num_reclaimed == orphaned and pending(client, keys) == 0


@pytest.mark.slow
@pytest.mark.parametrize("url", ["cluster"], indirect=True)
def test_sigterm_drains_inflight_in_every_shard_and_leaves_the_rest(
    model_dir, engine, url, client, keys, tmp_path
):
    ids = spread(keys, "d", 9)
    jobs = [job(keys, i, f"Essay {i}", stream=True, **LONG) for i in ids]
    flags = ("--max-inflight", "3", "--drain-timeout", "60")
    drainer = busy_worker(url, model_dir, client, keys, tmp_path, "drainer", jobs, 3, *flags)
    try:
        drainer.send_signal(signal.SIGTERM)
        assert drainer.wait(60) == 0, (tmp_path / "drainer.log").read_text()
    finally:
        drainer.kill()
    drained = finals(client, keys)
    assert 1 <= len(drained) < len(ids)
    assert all(
        v[0].status == "ok" and v[0].usage["completion_tokens"] == 400 for v in drained.values()
    )
    assert pending(client, keys) == 0  # everything it read, in any shard, finished and acked
    assert not consumer_alive(client, "drainer")

    with InProcessWorker(worker_config(url, engine.config, burst=True), engine) as rest:
        assert rest.join() == 0
    assert {k: len(v) for k, v in finals(client, keys).items()} == dict.fromkeys(ids, 1)


@pytest.mark.slow
def test_bulk_resumes_after_a_kill(engine, url, client, keys, tmp_path):
    ids = [f"q{i:02d}" for i in range(30)]
    params = {"max_tokens": 160, "ignore_eos": True, "temperature": 0.0}
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        "".join(json.dumps({"id": i, "prompt": i, "params": params}) + "\n" for i in ids)
    )
    out, log_path = tmp_path / "out.jsonl", tmp_path / "bulk.log"
    args = [sys.executable, "-m", "worker.cli", "bulk", str(inp), "-o", str(out)]
    args += ["--redis-url", url, "--window", "2", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    config = worker_config(url, engine.config, max_inflight=2)
    with InProcessWorker(config, engine):
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=log_file)
        try:
            wait_for(lambda: _lines(out) >= 4 or proc.poll() is not None, 120, "4 lines")
            assert proc.poll() is None, log_path.read_text()
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            proc.kill()
        before = out.read_bytes()
        assert 4 <= _lines(out) < len(ids), "the kill must land midway"
        assert main(["bulk", str(inp), "-o", str(out), "--redis-url", url, "--no-progress"]) == 0
    assert out.read_bytes().startswith(before)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["id"] for line in lines) == ids  # each once
    assert all(line["usage"]["completion_tokens"] == 160 for line in lines)


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_workers_given_a_subset_read_only_their_shards(engine, url, client, keys):
    ids = spread(keys, "r", 12)
    push(client, keys, [job(keys, i, "Hi", max_tokens=2) for i in ids])
    mine = (0, 1)
    config = worker_config(url, engine.config, burst=True, read_shards=mine)
    with InProcessWorker(config, engine) as worker:
        assert worker.join() == 0
    done = set(finals(client, keys))
    assert done == {i for i in ids if keys.shard_of(i) in mine} and done != set(ids)


@pytest.mark.slow
def test_a_primary_killed_mid_run_fails_over_to_its_replica(engine, tmp_path):
    """3 primaries with a replica each: one primary is killed under load, its replica takes
    its slots, the worker and the bulk follow the new topology; every line answered once."""
    cluster = start_cluster(deployment_server(), tmp_path / "cluster", primaries=3, replicas=1)
    try:
        url = cluster.url(shards=4)
        ids = [f"f{i:02d}" for i in range(40)]
        inp = tmp_path / "in.jsonl"
        params = {"max_tokens": 16, "ignore_eos": True, "temperature": 0.0}
        inp.write_text(
            "".join(json.dumps({"id": i, "prompt": i, "params": params}) + "\n" for i in ids)
        )
        out = tmp_path / "out.jsonl"
        watch = WatchConfig(check_s=0.2, lost_after_s=2.0, redis_down_s=60.0)
        config = BulkConfig(inp, out, redis_url=url, window=8, progress=False, watch=watch)
        victim = cluster.primaries[0]
        cfg = worker_config(url, engine.config, max_inflight=2, redis_timeout_s=2.0)
        with InProcessWorker(cfg, engine) as worker:

            def kill_midway() -> None:
                wait_for(lambda: _lines(out) >= 6, 120, "6 lines")
                victim.kill()

            killer = threading.Thread(target=kill_midway, daemon=True)
            killer.start()
            summary = asyncio.run(run_bulk(config))
            killer.join(5)
            assert worker.stop() == 0
        assert victim.process.poll() is not None
        with cluster.replicas[0].client() as promoted:
            assert promoted.info("replication")["role"] == "master"
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert sorted(line["id"] for line in lines) == ids  # each once
        assert all(line["usage"]["completion_tokens"] == 16 for line in lines)
        assert summary.requests == len(ids) and summary.errors == 0
    finally:
        cluster.stop()
