"""The clients count and report the jobs Redis lost instead of waiting for them forever.

A job is lost when Redis holds no result, no stream entry and no pending entry for it
(a restart without persistence, a failover to a replica that had not received it, a
FLUSHALL). `headrace bulk` resubmits such jobs (tests/producer/test_bulk.py); a client
raises JobLostError to whoever waits and counts the job once in `lost_jobs`.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from producer import AsyncClient, Client, JobLostError, ResultTimeoutError
from tests.producer.test_producer import Peer
from tests.redis_fixtures import RestartableRedis
from worker.protocol import Job, Result


def test_a_flushed_job_is_reported_lost_when_its_timeout_expires(redis_url: str) -> None:
    async def main(raw: aioredis.Redis) -> None:
        async with AsyncClient(redis_url) as client:
            kept, gone = await client.submit_many([{"prompt": "a"}, {"prompt": "b"}])
            entry = (await raw.xrange("headrace:requests"))[1][0]
            await raw.xdel("headrace:requests", entry)  # b's entry only: nothing restarted
            with pytest.raises(ResultTimeoutError) as queued:
                await client.result(kept, timeout=0.2)
            assert not isinstance(queued.value, JobLostError)  # still queued: only late
            with pytest.raises(JobLostError) as lost:
                await client.result(gone, timeout=0.2)
            assert lost.value.job_id == gone and isinstance(lost.value, TimeoutError)
            assert "submit it again" in str(lost.value)
            assert client.lost_jobs == 1
            start = time.monotonic()
            with pytest.raises(JobLostError):  # known lost: no second wait, no second count
                await client.result(gone, timeout=5)
            assert time.monotonic() - start < 1.0 and client.lost_jobs == 1

    asyncio.run(_with_raw(redis_url, main))


def test_a_lost_job_submitted_again_under_its_id_is_answered(redis_url: str) -> None:
    async def main(raw: aioredis.Redis) -> None:
        async with AsyncClient(redis_url) as client:
            job_id = await client.submit("hello", id="again")
            await raw.flushall()
            with pytest.raises(JobLostError):
                await client.result(job_id, timeout=0.2)
            with Peer(redis_url):
                assert await client.submit("hello", id="again") == job_id
                result = await client.result(job_id, timeout=10)
            assert (result.text, result.reused) == ("HELLO", False)
            assert client.lost_jobs == 1

    asyncio.run(_with_raw(redis_url, main))


def test_a_late_result_of_a_lost_job_is_still_returned(redis_url: str) -> None:
    """A worker that outlived the flush may still answer: the next call returns that."""

    async def main(raw: aioredis.Redis) -> None:
        async with AsyncClient(redis_url) as client:
            job_id = await client.submit("late")
            await raw.flushall()
            with pytest.raises(JobLostError):
                await client.result(job_id, timeout=0.2)
            with Peer(redis_url) as peer:  # plays the worker that was still running it
                job = Job(id=job_id, reply_to=client.reply_stream, prompt="late", params={})
                await asyncio.to_thread(peer._generate, b"0-1", job)
            result = await client.result(job_id, timeout=10)
            assert (result.id, result.text) == (job_id, "LATE")

    asyncio.run(_with_raw(redis_url, main))


def test_a_restart_without_data_fails_every_waiter_with_job_lost(restartable_redis) -> None:
    server: RestartableRedis = restartable_redis(persist=False)

    async def main() -> None:
        async with AsyncClient(server.url, lost_check_s=0.1) as client:
            ids = await client.submit_many({"prompt": p} for p in "abc")
            streamed = await client.submit("d", stream=True)
            # Waiting forever: only the watch can end these waits.
            waits = [asyncio.create_task(client.result(i)) for i in ids]
            waits.append(asyncio.create_task(_last(client, streamed)))
            await asyncio.sleep(0.3)
            assert not any(w.done() for w in waits)
            await asyncio.to_thread(server.restart)
            done, pending = await asyncio.wait(waits, timeout=20)
            assert not pending, "a waiter of a lost job was left waiting"
            errors = [w.exception() for w in done]
            assert all(isinstance(e, JobLostError) for e in errors), errors
            assert sorted(e.job_id for e in errors) == sorted([*ids, streamed])
            assert client.lost_jobs == 4

    asyncio.run(main())


def test_a_restart_with_the_jobs_kept_reports_nothing_lost(restartable_redis) -> None:
    server: RestartableRedis = restartable_redis(persist=True)
    with Client(server.url, lost_check_s=0.1) as client:
        ids = client.submit_many({"prompt": p} for p in "abc")
        server.restart()
        time.sleep(1.0)  # several checks after the new run_id: every job located
        with Peer(server.url):
            assert [client.result(i, timeout=20).text for i in ids] == ["A", "B", "C"]
        assert client.lost_jobs == 0


async def _last(client: AsyncClient, job_id: str) -> Result | None:
    final = None
    async for item in client.stream(job_id):
        final = item
    return final


async def _with_raw(redis_url: str, main) -> None:
    async with aioredis.Redis.from_url(redis_url) as raw:
        await main(raw)
