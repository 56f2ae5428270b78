"""At-least-once delivery, exactly one final result: crashes, freezes, SIGTERM drain, dead letters.

Workers that must die are real `headrace worker` processes; the surviving
worker runs in-process on a tiny llama so its counters can be read.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import os
import re
import signal
import time

import pytest
import redis
import redis.asyncio as aioredis

from producer.sync import Client
from tests.worker_harness import (
    KEYS,
    REPLY,
    InProcessWorker,
    consumer_alive,
    finals,
    job,
    pending_count,
    push,
    results,
    spawn_worker,
    standalone_publisher,
    wait_for,
    worker_config,
)
from worker.errors import RequestError

LONG = {"max_tokens": 400, "ignore_eos": True, "temperature": 0.0, "stream": True}


@pytest.fixture
def client(client: redis.Redis) -> redis.Redis:
    # The group exists before any child worker starts, so entries are never missed.
    client.xgroup_create(KEYS.requests, KEYS.group, id="0", mkstream=True)
    return client


def streamed_by(client: redis.Redis, consumer: str) -> bool:
    return any(r.status == "partial" and r.worker == consumer for r in results(client))


def pending_of(client: redis.Redis, consumer: str) -> set[str]:
    rows = client.xpending_range(KEYS.requests, KEYS.group, "-", "+", 1000, consumername=consumer)
    return {row["message_id"].decode() for row in rows}


def start_child(redis_url, model_dir, tmp_path, client, name, *flags):
    proc = spawn_worker(redis_url, model_dir, tmp_path / f"{name}.log", "--consumer", name, *flags)
    try:
        wait_for(lambda: consumer_alive(client, name) or proc.poll() is not None, 90, f"{name} up")
    except BaseException:
        proc.kill()
        raise
    assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()
    return proc


@pytest.mark.slow
def test_kill9_mid_generation_every_job_completes_once_on_the_other_worker(
    model_dir, engine, redis_url, client, tmp_path
):
    flags = ("--max-inflight", "4", "--max-num-seqs", "4", "--claim-idle-ms", "1000")
    victim = start_child(redis_url, model_dir, tmp_path, client, "victim", *flags)
    entry_ids = push(client, [job(f"k{i}", f"Story {i}", **LONG) for i in range(8)])
    try:
        wait_for(lambda: streamed_by(client, "victim"), 30, "victim generating")
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    finally:
        victim.kill()
    orphaned = pending_of(client, "victim")
    assert orphaned and not finals(client), "killed before finishing anything, holding jobs"

    rescuer_config = worker_config(redis_url, engine.config, claim_idle_ms=1000)
    with InProcessWorker(rescuer_config, engine) as rescuer:
        wait_for(lambda: len(finals(client)) == 8, 60, "all jobs done")
        assert rescuer.stop() == 0

    by_entry = dict(zip([f"k{i}" for i in range(8)], entry_ids, strict=True))
    for job_id, [final] in finals(client).items():
        assert final.status == "ok" and final.usage["completion_tokens"] == 400
        assert final.worker == rescuer_config.consumer
        assert final.attempt == (2 if by_entry[job_id] in orphaned else 1)
    assert {k: len(v) for k, v in finals(client).items()} == {k: 1 for k in by_entry}
    assert rescuer.service.recovery.num_reclaimed == len(orphaned)
    assert pending_count(client) == 0


@pytest.mark.slow
def test_frozen_worker_finishing_late_never_publishes_a_second_final(
    model_dir, engine, redis_url, client, tmp_path
):
    flags = ("--max-inflight", "4", "--claim-idle-ms", "1000", "--drain-timeout", "60")
    sleeper = start_child(redis_url, model_dir, tmp_path, client, "sleeper", *flags)
    push(client, [job(f"f{i}", f"Tale {i}", **LONG) for i in range(4)])
    try:
        wait_for(lambda: streamed_by(client, "sleeper"), 30, "sleeper generating")
        sleeper.send_signal(signal.SIGSTOP)  # a GC pause / stalled VM: alive but silent
        rescuer_config = worker_config(redis_url, engine.config, claim_idle_ms=1000)
        with InProcessWorker(rescuer_config, engine) as rescuer:
            wait_for(lambda: len(finals(client)) == 4, 60, "rescuer finished the jobs")
            assert rescuer.stop() == 0
        sleeper.send_signal(signal.SIGCONT)  # wakes up and completes its own copies
        sleeper.send_signal(signal.SIGTERM)
        assert sleeper.wait(60) == 0
    finally:
        sleeper.kill()
    log = (tmp_path / "sleeper.log").read_text()
    stats = ast.literal_eval(re.search(r"stopped: (\{.*\})", log).group(1))
    assert stats["duplicates"] >= 1 and stats["published"] == 0, stats
    assert all(
        len(v) == 1 and v[0].worker == rescuer_config.consumer for v in finals(client).values()
    )
    assert pending_count(client) == 0


@pytest.mark.slow
def test_sigterm_drains_inflight_and_leaves_the_rest_for_others(
    model_dir, engine, redis_url, client, tmp_path
):
    flags = ("--max-inflight", "3", "--drain-timeout", "60")
    drainer = start_child(redis_url, model_dir, tmp_path, client, "drainer", *flags)
    push(client, [job(f"d{i}", f"Essay {i}", **LONG) for i in range(9)])
    try:
        wait_for(lambda: streamed_by(client, "drainer"), 30, "drainer generating")
        drainer.send_signal(signal.SIGTERM)
        assert drainer.wait(60) == 0
    finally:
        drainer.kill()
    drained = finals(client)
    assert 1 <= len(drained) < 9
    assert all(
        v[0].status == "ok" and v[0].usage["completion_tokens"] == 400 for v in drained.values()
    )
    assert pending_count(client) == 0  # everything it read was finished and acked
    assert not consumer_alive(client, "drainer")

    with InProcessWorker(worker_config(redis_url, engine.config, burst=True), engine) as rest:
        assert rest.join() == 0
    assert {k: len(v) for k, v in finals(client).items()} == {f"d{i}": 1 for i in range(9)}


def test_poison_job_goes_to_dead_letter_after_max_attempts_while_others_finish(
    engine, redis_url, client
):
    poison_id, retry_id = push(client, [job("poison", "Boom"), job("retry", "Again")])
    # Consumers that die holding them: delivered once by XREADGROUP, then claimed by the next.
    client.xreadgroup(KEYS.group, "dead-1", {KEYS.requests: ">"}, count=2)
    client.xclaim(KEYS.requests, KEYS.group, "dead-2", 0, [poison_id])
    client.xclaim(KEYS.requests, KEYS.group, "dead-3", 0, [poison_id])
    push(client, [job(f"n{i}", f"Normal {i}", max_tokens=4) for i in range(5)])
    time.sleep(0.25)  # both now idle past claim_idle_ms

    config = worker_config(redis_url, engine.config, burst=True, claim_idle_ms=200, max_attempts=3)
    with InProcessWorker(config, engine) as worker:
        assert worker.join() == 0
    got = {k: v[0] for k, v in finals(client).items()}
    assert (got["poison"].status, got["poison"].error_code) == ("error", "max_attempts_exceeded")
    assert got["poison"].attempt == 4
    assert (got["retry"].status, got["retry"].attempt) == ("ok", 2)
    assert all(got[f"n{i}"].status == "ok" and got[f"n{i}"].attempt == 1 for i in range(5))
    [(_, dead)] = client.xrange(KEYS.dead_letter)
    assert dead[b"entry_id"].decode() == poison_id and dead[b"attempts"] == b"4"
    assert dead[b"code"] == b"max_attempts_exceeded" and dead[b"job"]
    assert worker.service.num_dead_lettered == 1 and pending_count(client) == 0


def test_what_dead_consumers_held_on_every_priority_level_is_reclaimed_or_dead_lettered(
    engine, redis_url, client
):
    """The high and low streams keep the default level's guarantees: a dead worker's entry
    runs again once (attempt 2), one out of attempts is dead-lettered once, naming its
    stream, and nothing stays pending on any level."""
    poison_ids = {}
    for priority in (5, 0, -5):  # the high, default and low levels
        stream = KEYS.request_stream(priority)
        with contextlib.suppress(redis.ResponseError):  # the default level's group exists
            client.xgroup_create(stream, KEYS.group, id="0", mkstream=True)
        _, poison_id = push(
            client,
            [
                job(f"held{priority}", "Again", max_tokens=4, priority=priority),
                job(f"poison{priority}", "Boom", priority=priority),
            ],
            stream,
        )
        client.xreadgroup(KEYS.group, "dead-1", {stream: ">"}, count=2)
        client.xclaim(stream, KEYS.group, "dead-2", 0, [poison_id])
        client.xclaim(stream, KEYS.group, "dead-3", 0, [poison_id])
        poison_ids[poison_id] = stream
    time.sleep(0.25)  # all idle past claim_idle_ms

    config = worker_config(redis_url, engine.config, burst=True, claim_idle_ms=200, max_attempts=3)
    with InProcessWorker(config, engine) as worker:
        assert worker.join() == 0
    got = finals(client)
    for priority in (5, 0, -5):
        [held] = got[f"held{priority}"]
        assert (held.status, held.attempt) == ("ok", 2)
        [poison] = got[f"poison{priority}"]
        assert (poison.status, poison.error_code, poison.attempt) == (
            "error",
            "max_attempts_exceeded",
            4,
        )
    dead = {
        f[b"entry_id"].decode(): f[b"stream"].decode() for _, f in client.xrange(KEYS.dead_letter)
    }
    assert dead == poison_ids
    assert worker.service.num_dead_lettered == 3
    for stream in KEYS.request_streams:
        assert int(client.xpending(stream, KEYS.group)["pending"]) == 0


def test_a_refusal_written_twice_is_dead_lettered_and_counted_once(redis_url, client):
    # Under load an entry can be reclaimed again while its refusal is still being written
    # (CI saw it): the second write must neither dead-letter nor count it a second time.
    [entry_id] = push(client, [job("poison", "Boom")])
    client.xreadgroup(KEYS.group, "w", {KEYS.requests: ">"})
    firsts: list[bool] = []

    async def refuse_twice() -> None:
        aclient = aioredis.Redis.from_url(redis_url)
        publisher = standalone_publisher(aclient, 60)
        flusher = asyncio.create_task(publisher.run())
        error = RequestError("max_attempts_exceeded", "delivered too often")
        for attempt in (4, 5):
            fields = {"entry_id": entry_id, "attempts": attempt, "code": error.code}
            publisher.refuse(
                (KEYS.requests, entry_id), "poison", REPLY, error, attempt, fields, firsts.append
            )
            await publisher.wait_idle()
        flusher.cancel()
        await aclient.aclose()

    asyncio.run(refuse_twice())
    assert firsts == [True, False]
    [(_, dead)] = client.xrange(KEYS.dead_letter)
    assert dead[b"attempts"] == b"4"
    [final] = [r for r in results(client) if r.id == "poison"]
    assert (final.error_code, final.attempt) == ("max_attempts_exceeded", 4)
    assert pending_count(client) == 0


def test_live_worker_keeps_its_claims_fresh(engine, redis_url, client):
    config = worker_config(redis_url, engine.config, claim_idle_ms=300)
    with InProcessWorker(config, engine) as worker, Client(redis_url) as producer:
        ids = [producer.submit(f"Long {i}", max_tokens=1000, ignore_eos=True) for i in range(4)]
        wait_for(lambda: len(pending_of(client, config.consumer)) == 4, 10, "jobs claimed")
        deadline = time.monotonic() + 1.2  # four claim_idle_ms periods
        while time.monotonic() < deadline:
            # What a rescuer would see: nothing idle long enough to take over.
            _, stolen, *_ = client.xautoclaim(KEYS.requests, KEYS.group, "thief", 300, count=10)
            assert stolen == []
            time.sleep(0.05)
        running = [job_id for job_id in ids if not client.exists(KEYS.result(job_id))]
        assert running == ids, "the jobs must still run for this check to mean anything"
        for job_id in ids:
            producer.cancel(job_id)
        assert {producer.result(job_id, timeout=10).status for job_id in ids} == {"cancelled"}
        assert worker.stop() == 0


@pytest.mark.slow
def test_embedded_redis_by_default_and_ctrl_c_drains(model_dir, tmp_path):
    log_path = tmp_path / "embedded.log"
    worker = spawn_worker(None, model_dir, log_path, "--consumer", "solo", new_session=True)
    try:
        found = wait_for(
            lambda: (
                re.search(r"embedded Redis at (redis://\S+)", log_path.read_text())
                or worker.poll() is not None
            ),
            90,
            "the embedded Redis URL",
        )
        assert worker.poll() is None, log_path.read_text()
        url = found.group(1)
        with Client(url) as producer:
            probe = redis.Redis.from_url(url)
            wait_for(lambda: consumer_alive(probe, "solo"), 90, "worker ready")
            probe.close()
            job_id = producer.submit("Count", stream=True, max_tokens=400, ignore_eos=True)
            stream = producer.stream(job_id, timeout=30)
            assert next(stream).status == "partial"
            os.killpg(worker.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole group
            final = [r for r in stream if r.final][0]
            assert final.status == "ok" and final.usage["completion_tokens"] == 400
        assert worker.wait(60) == 0
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)


def test_drain_timeout_leaves_unfinished_jobs_pending_and_reclaimable_at_once(
    engine, redis_url, client
):
    push(client, [job(f"t{i}", f"Long {i}", max_tokens=500, ignore_eos=True) for i in range(3)])
    quitter_config = worker_config(redis_url, engine.config, drain_timeout_s=0.0)
    with InProcessWorker(quitter_config, engine) as quitter:
        wait_for(lambda: engine.stats().num_running == 3, 10, "jobs running")
        assert quitter.stop() == 0
    assert not finals(client) and pending_count(client) == 3  # not acked: not lost
    idle = [
        row["time_since_delivered"]
        for row in client.xpending_range(KEYS.requests, KEYS.group, "-", "+", 10)
    ]
    assert min(idle) >= quitter_config.claim_idle_ms  # released: no wait for a rescuer

    rescuer_config = worker_config(redis_url, engine.config, burst=True)
    with InProcessWorker(rescuer_config, engine) as rescuer:
        assert rescuer.join() == 0
    got = finals(client)
    assert sorted(got) == ["t0", "t1", "t2"]
    assert all(v[0].status == "ok" and v[0].attempt == 2 for v in got.values())
    assert pending_count(client) == 0
