"""Redis outages and data loss: the worker rides them out and never counts a delivery that did not happen.

Faults are real where Redis can produce them on demand (FLUSHALL, a lost group,
restarts with and without an append-only file, killed connections, CLIENT PAUSE,
deleted entries on Redis 6.2 and 7) and injected at a stage boundary where the timing
must be exact (a connection lost in one given call).
"""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
import redis
import redis.exceptions

from producer.sync import Client
from tests.worker_harness import (
    KEYS,
    InProcessWorker,
    finals,
    job,
    pending_count,
    push,
    wait_for,
    worker_config,
)
from worker.protocol import decode_result
from worker.redis_url import connect_async
from worker.service.intake import Intake
from worker.service.publish import Publisher
from worker.service.reader import StreamReader
from worker.service.recovery import Recovery
from worker.service.resilience import Retrier

LONG = {"max_tokens": 300, "ignore_eos": True, "temperature": 0.0}
SHORT = {"max_tokens": 4, "ignore_eos": True, "temperature": 0.0}


def dropped_once(monkeypatch, cls, name: str, *, after_call: bool = False) -> list[int]:
    """Make one call of `cls.name` fail with a ConnectionError: the first one, before it
    reaches Redis; or with `after_call`, the first one that returned entries, after Redis
    ran it (its reply lost with the connection). Returns a list that gets an item then.
    """
    real = getattr(cls, name)
    fired: list[int] = []

    async def flaky(self, *args, **kwargs):
        if not fired and not after_call:
            fired.append(1)
            raise redis.exceptions.ConnectionError("connection dropped (injected)")
        result = await real(self, *args, **kwargs)
        if not fired and result:
            fired.append(1)
            raise redis.exceptions.ConnectionError("reply lost (injected)")
        return result

    monkeypatch.setattr(cls, name, flaky)
    return fired


def orphan(client: redis.Redis, entry_ids: list[str]) -> None:
    """Deliver the entries to a consumer that then died long ago: idle 60 s, claimable at once.

    (XCLAIM JUSTID sets the idle time without counting a delivery; a worker with
    claim_idle_ms 30 s then reclaims them, and never its own live entries, however slow
    the machine.)
    """
    client.xreadgroup(KEYS.group, "dead", {KEYS.requests: ">"})
    client.xclaim(KEYS.requests, KEYS.group, "dead", 0, entry_ids, idle=60_000, justid=True)


def one_final_each(client: redis.Redis) -> dict[str, tuple[str, int]]:
    """job id → (status, attempt) of its only final result (fails on duplicates)."""
    got = finals(client)
    assert all(len(v) == 1 for v in got.values()), {k: len(v) for k, v in got.items()}
    return {job_id: (v[0].status, v[0].attempt) for job_id, v in got.items()}


def run_burst(config, engine) -> InProcessWorker:
    with InProcessWorker(config, engine) as worker:
        assert worker.join() == 0
    return worker


# -- a connection lost in one call ---------------------------------------------------------


def test_a_connection_lost_while_preparing_costs_no_delay_and_no_delivery(
    engine, redis_url, client, monkeypatch
):
    fired = dropped_once(monkeypatch, StreamReader, "screen")
    push(client, [job(f"p{i}", f"Prompt {i}", **SHORT) for i in range(4)])
    # A batch given up would wait 60 s for a reclaim (and burst mode would end without it).
    config = worker_config(redis_url, engine.config, burst=True, claim_idle_ms=60_000)
    worker = run_burst(config, engine)
    assert fired
    assert one_final_each(client) == {f"p{i}": ("ok", 1) for i in range(4)}
    assert worker.service.recovery.num_reclaimed == 0 and pending_count(client) == 0


def test_entries_claimed_before_a_failed_read_are_kept(engine, redis_url, client, monkeypatch):
    client.xgroup_create(KEYS.requests, KEYS.group, id="0", mkstream=True)
    orphan(client, push(client, [job("orphan", "Again", **SHORT)]))
    fired = dropped_once(monkeypatch, StreamReader, "read")  # the XREADGROUP right after XAUTOCLAIM
    config = worker_config(redis_url, engine.config, burst=True, claim_idle_ms=30_000)
    worker = run_burst(config, engine)
    assert fired
    # Claimed once by this worker: attempt 2. Dropping the claim would have made it 3.
    assert one_final_each(client) == {"orphan": ("ok", 2)}
    assert worker.service.recovery.num_reclaimed == 1 and pending_count(client) == 0


def test_entries_whose_read_reply_was_lost_are_adopted_not_redelivered(
    engine, redis_url, client, monkeypatch
):
    fired = dropped_once(monkeypatch, StreamReader, "read", after_call=True)
    push(client, [job(f"l{i}", f"Lost {i}", **SHORT) for i in range(3)])
    config = worker_config(redis_url, engine.config, burst=True, claim_idle_ms=60_000)
    worker = run_burst(config, engine)
    assert fired
    # Delivered once (by the read whose reply was lost): attempt 1, no reclaim needed.
    assert one_final_each(client) == {f"l{i}": ("ok", 1) for i in range(3)}
    recovery = worker.service.recovery
    assert (recovery.num_adopted, recovery.num_reclaimed) == (3, 0)
    assert pending_count(client) == 0


# -- a lost consumer group ---------------------------------------------------------------------


@pytest.mark.parametrize("call", ["read", "reclaim", "adopt", "heartbeat"])
def test_every_group_call_survives_a_lost_group(redis_url, client, call):
    """NOGROUP (Redis came back empty, a failover without the group): re-created, call retried."""

    async def scenario() -> object:
        aclient = connect_async(redis_url)
        reader = StreamReader(aclient, KEYS, "c")
        recovery = Recovery(
            aclient, KEYS, "c", claim_idle_ms=1, max_attempts=3, liveness_ttl_s=5, held=tuple
        )
        calls = {
            "read": lambda: reader.read(10, None),
            "reclaim": lambda: recovery.reclaim(10),
            "adopt": recovery.adopt,
            "heartbeat": lambda: recovery.heartbeat([(KEYS.requests, "1-0")], {}),
        }
        try:
            return await Retrier(reader.ensure_group, base_s=0.001).call(call, calls[call])
        finally:
            await aclient.aclose()

    [entry_id] = push(client, [job("after", "Added after the flush")])  # a stream, no group
    result = asyncio.run(scenario())
    # Created at id 0: the entry added before the group existed is still delivered.
    if call == "read":
        assert [e.entry_id for e in result] == [entry_id]
    else:
        [(_, entries)] = client.xreadgroup(KEYS.group, "x", {KEYS.requests: ">"})
        assert [eid.decode() for eid, _ in entries] == [entry_id]


def test_flushall_mid_run_the_worker_recreates_the_group_and_serves_new_jobs(
    engine, redis_url, client
):
    config = worker_config(redis_url, engine.config, max_inflight=4)
    with InProcessWorker(config, engine) as worker:
        push(client, [job(f"old{i}", f"Old {i}", **LONG) for i in range(4)])
        wait_for(lambda: engine.stats().num_running == 4, 10, "old jobs running")
        client.flushall()  # or a restart without persistence: queue, group and results gone
        push(client, [job(f"new{i}", f"New {i}", **SHORT) for i in range(4)])
        want = {f"{kind}{i}" for kind in ("old", "new") for i in range(4)}
        wait_for(lambda: set(finals(client)) == want, 30, "old and new jobs done")
        assert worker.stop() == 0
    # The running jobs finished and answered into the empty Redis; new jobs ran once.
    assert set(one_final_each(client).values()) == {("ok", 1)}
    assert not worker.service.health.dead_tasks and pending_count(client) == 0


def test_a_lost_group_is_recreated_and_no_job_runs_twice(engine, redis_url, client):
    config = worker_config(redis_url, engine.config, max_inflight=2)
    with InProcessWorker(config, engine) as worker:
        push(client, [job(f"g{i}", f"Group {i}", **SHORT) for i in range(2)])
        wait_for(lambda: len(finals(client)) == 2, 20, "first jobs done")
        push(client, [job(f"g{i}", f"Group {i}", **LONG) for i in range(2, 8)])
        wait_for(lambda: engine.stats().num_running == 2, 10, "jobs running")
        # A failover to a replica without the group: the stream survives, the group does not.
        client.xgroup_destroy(KEYS.requests, KEYS.group)
        wait_for(lambda: len(finals(client)) == 8, 60, "all jobs done")
        assert worker.stop() == 0
    # Re-created at id 0, the group delivers every entry again: the finished ones are only
    # acked (their result exists), the running ones are recognised as already held.
    assert one_final_each(client) == {f"g{i}": ("ok", 1) for i in range(8)}
    assert pending_count(client) == 0


# -- Redis restarts ------------------------------------------------------------------------------


def test_redis_restart_without_persistence_the_worker_serves_new_jobs(engine, restartable_redis):
    server = restartable_redis(persist=False)
    probe = redis.Redis.from_url(server.url)
    config = worker_config(server.url, engine.config, max_inflight=4)
    with InProcessWorker(config, engine) as worker:
        push(probe, [job(f"r{i}", f"Run {i}", **LONG) for i in range(6)])
        wait_for(lambda: engine.stats().num_running == 4, 10, "four jobs running")
        running = {s.job.id for s in list(worker.service.inflight.values())}
        server.restart()  # comes back empty: the two queued jobs are gone with it
        push(probe, [job(f"n{i}", f"New {i}", **SHORT) for i in range(3)])
        want = running | {f"n{i}" for i in range(3)}
        wait_for(lambda: set(finals(probe)) == want, 60, "running and new jobs done")
        assert worker.stop() == 0
    assert set(one_final_each(probe).values()) == {("ok", 1)}
    assert not worker.service.health.dead_tasks and pending_count(probe) == 0
    probe.close()


def test_redis_restart_with_aof_completes_every_job_exactly_once(engine, restartable_redis):
    server = restartable_redis(persist=True)
    probe = redis.Redis.from_url(server.url)
    # A long claim_idle_ms: a slow machine must not make the worker reclaim its own jobs.
    config = worker_config(server.url, engine.config, max_inflight=4, claim_idle_ms=30_000)
    with InProcessWorker(config, engine) as worker:
        push(probe, [job(f"a{i}", f"Keep {i}", **LONG) for i in range(8)])
        wait_for(lambda: engine.stats().num_running == 4, 10, "four jobs running")
        server.restart()
        wait_for(lambda: len(finals(probe)) == 8, 60, "all jobs done")
        assert worker.stop() == 0
    assert one_final_each(probe) == {f"a{i}": ("ok", 1) for i in range(8)}
    assert worker.service.recovery.num_reclaimed == 0 and pending_count(probe) == 0
    probe.close()


# -- dropped and stalled connections ---------------------------------------------------------------


def kill_worker_connections(client: redis.Redis, consumer: str) -> int:
    name = f"headrace-worker:{consumer}"
    ids = [c["id"] for c in client.client_list() if c.get("name") == name]
    for client_id in ids:
        client.client_kill_filter(_id=client_id)
    return len(ids)


@pytest.mark.slow
def test_killed_connections_lose_no_job_and_count_no_delivery(engine, redis_url, client):
    rng = random.Random(1234)
    config = worker_config(redis_url, engine.config, max_inflight=4, claim_idle_ms=30_000)
    kills: list[int] = []
    done = threading.Event()

    def killer() -> None:
        while not done.wait(rng.uniform(0.05, 0.25)):
            kills.append(kill_worker_connections(client, config.consumer))

    with InProcessWorker(config, engine) as worker, Client(redis_url) as producer:
        push(client, [job(f"k{i}", f"Kill {i}", **LONG) for i in range(16)])
        thread = threading.Thread(target=killer)
        thread.start()
        try:
            wait_for(lambda: len(finals(client)) == 16, 90, "all jobs done")
        finally:
            done.set()
            thread.join()
        # Cancels still work: by the subscription, or by the check of cancel keys that
        # follows each resubscription (the subscription may still be coming back).
        long_id = producer.submit("Go on", stream=True, max_tokens=2000, ignore_eos=True)
        assert next(producer.stream(long_id, timeout=30)).status == "partial"
        producer.cancel(long_id)
        assert producer.result(long_id, timeout=30).status == "cancelled"
        assert worker.stop() == 0
    assert sum(kills) >= 10, kills  # the connections really were killed, many times
    got = one_final_each(client)
    assert {got[f"k{i}"] for i in range(16)} == {("ok", 1)}
    assert worker.service.recovery.num_reclaimed == 0 and pending_count(client) == 0
    assert not worker.service.health.dead_tasks


def test_a_cancel_sent_while_unsubscribed_reaches_a_running_job(redis_url, client):
    client.set(KEYS.cancelled("running"), 1)  # published while the subscription was down

    async def scenario() -> list[str]:
        aclient = connect_async(redis_url)
        reader = StreamReader(aclient, KEYS, "c")
        subscribed, closing, cancelled = asyncio.Event(), asyncio.Event(), []
        held = ["running", "other"]
        task = asyncio.create_task(
            reader.listen_cancels(cancelled.append, subscribed, closing, held=lambda: held)
        )
        await asyncio.wait_for(subscribed.wait(), 5)
        closing.set()
        await task
        await aclient.aclose()
        return cancelled

    assert asyncio.run(scenario()) == ["running"]


def test_a_stalled_redis_times_out_and_the_worker_carries_on(engine, redis_url, client, caplog):
    # Slow to answer is what a silently dropped connection looks like from this side.
    config = worker_config(redis_url, engine.config, redis_timeout_s=0.25, claim_idle_ms=30_000)
    with InProcessWorker(config, engine) as worker:
        push(client, [job(f"s{i}", f"Stall {i}", **LONG) for i in range(4)])
        wait_for(lambda: engine.stats().num_running == 4, 10, "jobs running")
        client.execute_command("CLIENT", "PAUSE", 1500, "ALL")
        wait_for(lambda: len(finals(client)) == 4, 60, "all jobs done")
        assert worker.stop() == 0
    assert one_final_each(client) == {f"s{i}": ("ok", 1) for i in range(4)}
    assert any("Timeout" in r.getMessage() for r in caplog.records if r.name.startswith("worker"))
    assert worker.service.recovery.num_reclaimed == 0 and pending_count(client) == 0


# -- entries deleted from the stream -----------------------------------------------------------------


@pytest.fixture(params=["redis7", "redis6.2"])
def any_redis_url(request, redis_url, redis62_server) -> str:
    if request.param == "redis7":
        return redis_url
    client = redis.Redis.from_url(redis62_server.url)
    client.flushall()
    client.close()
    return redis62_server.url


def test_a_reclaimed_entry_deleted_from_the_stream_is_acked_and_answered(engine, any_redis_url):
    client = redis.Redis.from_url(any_redis_url)
    client.xgroup_create(KEYS.requests, KEYS.group, id="0", mkstream=True)
    gone, kept = push(client, [job("gone", "Trimmed"), job("kept", "Stays", **SHORT)])
    orphan(client, [gone, kept])
    client.xdel(KEYS.requests, gone)  # trimmed while its consumer was dead
    config = worker_config(any_redis_url, engine.config, burst=True, claim_idle_ms=30_000)
    run_burst(config, engine)
    assert one_final_each(client) == {"kept": ("ok", 2)}
    # Its job id died with the payload: the error result is filed under the entry id.
    error = decode_result(client.get(KEYS.result(gone)))
    assert (error.status, error.error_code) == ("error", "entry_deleted")
    [(_, dead)] = client.xrange(KEYS.dead_letter)
    assert dead[b"entry_id"].decode() == gone and dead[b"code"] == b"entry_deleted"
    assert pending_count(client) == 0  # Redis 6.2 would have kept it pending forever
    client.close()


# -- background tasks ------------------------------------------------------------------------------


def fail_from(monkeypatch, cls, name: str, nth: int) -> None:
    """From its `nth` call on, `cls.name` raises a RuntimeError (a bug, not an outage)."""
    real = getattr(cls, name)
    calls: list[int] = []

    def check() -> None:
        calls.append(1)
        if len(calls) >= nth:
            raise RuntimeError(f"bug in {name}")

    if asyncio.iscoroutinefunction(real):

        async def broken(self, *args, **kwargs):
            check()
            return await real(self, *args, **kwargs)
    else:

        def broken(self, *args, **kwargs):
            check()
            return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, broken)


@pytest.mark.parametrize(
    ("task", "cls", "method", "nth", "job_left_pending"),
    [
        ("heartbeat", Recovery, "heartbeat", 2, None),  # the first one runs before ready
        ("publisher", Publisher, "_execute", 1, True),
        ("read loop", Intake, "decode", 1, True),
    ],
)
def test_a_task_that_dies_stops_the_worker_with_exit_1(
    engine, redis_url, client, monkeypatch, caplog, task, cls, method, nth, job_left_pending
):
    fail_from(monkeypatch, cls, method, nth)
    config = worker_config(redis_url, engine.config, heartbeat_interval_s=0.2)
    worker = InProcessWorker(config, engine)
    with worker:
        push(client, [job("victim", "Anything", **SHORT)])
        assert worker.join(30) == 1
    live, body = worker.service.health.live()
    assert not live and body["dead_tasks"] == [task]  # /healthz answers 503
    assert any(r.exc_info and f"bug in {method}" in str(r.exc_info[1]) for r in caplog.records)
    if job_left_pending:  # not lost: another worker reclaims it
        assert not finals(client) and pending_count(client) == 1
