"""Bounded memory in Redis: finished request entries are deleted, dead letters keep a bounded
prefix of the job, reply streams that workers write get a TTL (docs/protocol.md, Retention)."""

from __future__ import annotations

import asyncio

import msgpack
import redis
import redis.asyncio as aioredis

from tests.worker_harness import (
    KEYS,
    REPLY,
    InProcessWorker,
    finals,
    job,
    pending_count,
    push,
    standalone_publisher,
    wait_for,
    worker_config,
)
from worker.cli.stats import collect
from worker.keys import JOB_FIELD
from worker.service.jobs import JobState
from worker.service.recovery import DEAD_LETTER_JOB_BYTES

RUNS = {"max_tokens": 1000, "ignore_eos": True, "temperature": 0.0, "stream": True}
SHORT = {"max_tokens": 3, "temperature": 0.0}
TTL = 600


def entry_ids(client: redis.Redis) -> list[str]:
    return [eid.decode() for eid, _ in client.xrange(KEYS.requests)]


def running(worker: InProcessWorker, job_id: str) -> bool:
    state = worker.service.inflight.get(job_id)
    return state is not None and state.running and bool(state.output and state.output.token_ids)


def cancel(client: redis.Redis, job_id: str) -> None:
    client.set(KEYS.cancelled(job_id), 1, ex=60)
    client.publish(KEYS.cancel_channel, job_id)


def test_finished_entries_are_deleted_and_pending_or_undelivered_ones_stay(
    engine, redis_url, client
):
    # A job pending under another consumer (running there, never reclaimed here).
    client.xgroup_create(KEYS.requests, KEYS.group, id="0", mkstream=True)
    [held] = push(client, [job("elsewhere", "Held")])
    client.xreadgroup(KEYS.group, "other", {KEYS.requests: ">"}, count=1)
    config = worker_config(
        redis_url, engine.config, max_inflight=2, result_ttl_s=TTL, claim_idle_ms=60_000
    )
    with InProcessWorker(config, engine) as worker:
        push(client, [job(f"s{i}", f"Short {i}", **SHORT) for i in range(3)])
        wait_for(lambda: len(finals(client)) == 3, 30, "short jobs done")
        wait_for(lambda: entry_ids(client) == [held], 10, "finished entries deleted")

        [first] = push(client, [job("long1", "Once upon a time", **RUNS)])
        wait_for(lambda: running(worker, "long1"), 30, "long1 running")
        # A second submission of a running id: acked at once, deleted with long1's result.
        [again] = push(client, [job("long1", "Once upon a time", **RUNS)])
        [second] = push(client, [job("long2", "Far away", **RUNS)])
        wait_for(lambda: running(worker, "long2"), 30, "long2 running")
        [waiting] = push(client, [job("later", "Hi", **SHORT)])  # no room: never delivered
        wait_for(lambda: pending_count(client) == 3, 10, "the duplicate acked")

        assert not {"long1", "long2"} & set(finals(client)), "must still run for this check"
        assert entry_ids(client) == [held, first, again, second, waiting]
        group = client.xinfo_groups(KEYS.requests)[0]
        assert group["last-delivered-id"].decode() == second  # `waiting` is undelivered
        assert collect(client, KEYS).lag == 1

        cancel(client, "long1")
        wait_for(lambda: "later" in finals(client), 30, "later done after long1 ended")
        assert entry_ids(client) == [held, second]  # only running jobs' entries are left
        assert collect(client, KEYS).lag == 0

        cancel(client, "long2")
        wait_for(lambda: "long2" in finals(client), 30, "long2 cancelled")
        wait_for(lambda: entry_ids(client) == [held], 10, "every finished entry deleted")
        assert pending_count(client) == 1
        # Written by the worker only (nobody created it): it expires after result_ttl.
        assert 0 < client.ttl(REPLY) <= TTL
        assert worker.stop() == 0
    assert {k: len(v) for k, v in finals(client).items()} == {
        **{f"s{i}": 1 for i in range(3)},
        **{"long1": 1, "long2": 1, "later": 1},
    }


def test_dead_letters_keep_a_bounded_prefix_and_the_size(engine, redis_url, client):
    # Over the size cap and without reply_to: nobody to answer, so both are dead-lettered.
    big = msgpack.packb({"v": 1, "id": "huge", "prompt": "many words " * 2000})
    small = b"\xc1 not msgpack"
    push(client, [big, small])
    config = worker_config(redis_url, engine.config, burst=True, max_payload_bytes=8192)
    with InProcessWorker(config, engine) as worker:
        assert worker.join() == 0
    dead = {f[b"job_size"]: f for _, f in client.xrange(KEYS.dead_letter)}
    assert set(dead) == {str(len(big)).encode(), str(len(small)).encode()}
    cut, whole = dead[str(len(big)).encode()], dead[str(len(small)).encode()]
    assert len(big) > DEAD_LETTER_JOB_BYTES
    assert cut[JOB_FIELD.encode()] == big[:DEAD_LETTER_JOB_BYTES] and cut[b"job_truncated"] == b"1"
    assert whole[JOB_FIELD.encode()] == small and whole[b"job_truncated"] == b"0"
    assert (cut[b"code"], whole[b"code"]) == (b"payload_too_large", b"invalid_request")
    assert client.xlen(KEYS.requests) == 0 and pending_count(client) == 0


def test_reply_streams_get_a_ttl_unless_their_owner_made_them_persistent(engine, redis_url, client):
    fresh, persistent, short = KEYS.reply("fresh"), "app:replies", KEYS.reply("short")
    client.xadd(persistent, {"hello": "1"})
    client.xadd(short, {"hello": "1"})
    client.expire(short, 100)
    push(
        client,
        [
            job("t1", "One", reply_to=fresh, stream=True, **SHORT),
            job("t2", "Two", reply_to=persistent, **SHORT),
            job("t3", "Three", reply_to=short, **SHORT),
        ],
    )
    config = worker_config(redis_url, engine.config, burst=True, result_ttl_s=TTL)
    with InProcessWorker(config, engine) as worker:
        assert worker.join() == 0
    assert all(finals(client, s) for s in (fresh, persistent, short))
    assert TTL - 60 < client.ttl(fresh) <= TTL
    assert client.ttl(persistent) == -1
    assert TTL - 60 < client.ttl(short) <= TTL  # extended, never shortened


def test_a_delta_alone_gives_a_new_reply_stream_its_ttl(redis_url, client):
    stream = KEYS.reply("deltas")
    state = JobState("1-1", job("d", "Hi", reply_to=stream, stream=True), 1, KEYS.requests)

    async def one_delta() -> None:
        aclient = aioredis.Redis.from_url(redis_url)
        publisher = standalone_publisher(aclient, TTL)
        flusher = asyncio.create_task(publisher.run())
        publisher.partial(state, "Hel", (1, 2))
        await publisher.wait_idle()
        flusher.cancel()
        await aclient.aclose()

    asyncio.run(one_delta())
    assert client.xlen(stream) == 1 and TTL - 60 < client.ttl(stream) <= TTL
