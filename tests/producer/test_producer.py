"""Producer clients against a real redis-server and a minimal protocol-v1 peer.

`Peer` is a tiny worker speaking the wire protocol (XREADGROUP on the request
stream, results on reply_to, SET NX result key, XACK): it uppercases prompts
instead of running a model, so these tests pin the client, not the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

import worker.cli.submit
from producer import AsyncClient, Client, ClientClosedError, ResultTimeoutError
from producer.submission import DONE, LOST, QUEUED, Submitter
from worker.cli import main as cli_main
from worker.errors import RequestError
from worker.keys import JOB_FIELD, RESULT_FIELD, Keys
from worker.protocol import (
    Job,
    JobDecodeError,
    Result,
    decode_job,
    encode_result,
    error_result,
)

KEYS = Keys()


class Peer:
    """Answers jobs: text = prompt (or last message) uppercased, cut at max_tokens chars.

    Prompt "silent" gets no answer; prompt "fail" gets an `internal` error result.
    """

    def __init__(self, url: str) -> None:
        self.redis = redis.Redis.from_url(url)
        self.seen: dict[str, str] = {}  # job id → reply_to
        self.jobs: dict[str, Job] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: it exists already
            self.redis.xgroup_create(KEYS.requests, KEYS.group, id="0", mkstream=True)

    def __enter__(self) -> Peer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.redis.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            streams = {KEYS.requests: ">"}
            response = self.redis.xreadgroup(KEYS.group, "peer", streams, count=64, block=50)
            for _name, entries in response or ():
                for entry_id, entry in entries:
                    self._answer(entry_id, entry[JOB_FIELD.encode()])

    def _answer(self, entry_id: bytes, payload: bytes) -> None:
        try:
            job = decode_job(payload, max_bytes=1 << 20)
        except JobDecodeError as err:
            if err.reply_to and err.job_id:
                self.publish(entry_id, err.reply_to, error_result(err.job_id, err.error))
            return
        self.seen[job.id] = job.reply_to
        self.jobs[job.id] = job
        if job.prompt == "silent":
            self.redis.xack(KEYS.requests, KEYS.group, entry_id)
        elif job.prompt == "fail":
            err = RequestError("internal", "asked to fail")
            self.publish(entry_id, job.reply_to, error_result(job.id, err))
        else:
            self._generate(entry_id, job)

    def _generate(self, entry_id: bytes, job: Job) -> None:
        source = job.prompt or (job.messages[-1]["content"] if job.messages else "")
        text = source.upper()[: job.params.get("max_tokens", len(source))]
        if job.stream:
            for ch in text:
                delta = Result(id=job.id, status="partial", delta=ch, attempt=1)
                self.redis.xadd(job.reply_to, {RESULT_FIELD: encode_result(delta)})
        usage = {"prompt_tokens": len(source), "completion_tokens": len(text)}
        final = Result(id=job.id, status="ok", text=text, finish_reason="stop", usage=usage)
        self.publish(entry_id, job.reply_to, final)

    def publish(self, entry_id: bytes, reply_to: str, result: Result) -> None:
        payload = encode_result(result)
        if self.redis.set(KEYS.result(result.id), payload, nx=True, ex=60):
            self.redis.xadd(reply_to, {RESULT_FIELD: payload})
        self.redis.xack(KEYS.requests, KEYS.group, entry_id)


@pytest.fixture
def peer(redis_url: str) -> Iterator[Peer]:
    with Peer(redis_url) as running:
        yield running


def test_generate_round_trip(redis_url: str, peer: Peer) -> None:
    async def main() -> Result:
        async with AsyncClient(redis_url) as client:
            return await client.generate("hello", max_tokens=3, timeout=10)

    result = asyncio.run(main())
    assert (result.status, result.text, result.usage) == (
        "ok",
        "HEL",
        {"prompt_tokens": 5, "completion_tokens": 3},
    )
    assert peer.seen[result.id].startswith("headrace:reply:")


def test_submit_many_then_results_in_any_order(redis_url: str, peer: Peer) -> None:
    async def main() -> None:
        async with AsyncClient(redis_url) as client:
            items = [{"prompt": f"job {i}", "id": f"j{i}"} for i in range(40)]
            items.append({"messages": [{"role": "user", "content": "chat"}], "id": "m"})
            ids = await client.submit_many(items)
            assert ids == [item["id"] for item in items]
            for i in reversed(range(40)):
                assert (await client.result(f"j{i}", timeout=10)).text == f"JOB {i}"
            assert (await client.result("m", timeout=10)).text == "CHAT"

    asyncio.run(main())


def test_two_clients_never_see_each_others_results(redis_url: str, peer: Peer) -> None:
    async def run_client(name: str) -> tuple[str, dict[str, str]]:
        async with AsyncClient(redis_url) as client:
            ids = await client.submit_many({"prompt": f"{name}{i}"} for i in range(20))
            texts = {i: (await client.result(i, timeout=10)).text for i in ids}
            return client.reply_stream, texts

    async def main() -> list[tuple[str, dict[str, str]]]:
        return list(await asyncio.gather(run_client("a"), run_client("b")))

    (stream_a, texts_a), (stream_b, texts_b) = asyncio.run(main())
    assert stream_a != stream_b
    assert sorted(texts_a.values()) == sorted(f"A{i}" for i in range(20))
    assert sorted(texts_b.values()) == sorted(f"B{i}" for i in range(20))
    assert all(peer.seen[i] == stream_a for i in texts_a)
    assert all(peer.seen[i] == stream_b for i in texts_b)


def test_result_timeout_then_late_result(redis_url: str, peer: Peer) -> None:
    async def main() -> None:
        async with AsyncClient(redis_url) as client:
            job_id = await client.submit("silent")
            start = time.monotonic()
            with pytest.raises(TimeoutError):
                await client.result(job_id, timeout=0.3)
            assert 0.3 <= time.monotonic() - start < 2.0
            late = Result(id=job_id, status="ok", text="late")
            await client._require().xadd(client.reply_stream, {RESULT_FIELD: encode_result(late)})
            assert (await client.result(job_id, timeout=10)).text == "late"

    asyncio.run(main())


def test_sync_result_timeout_is_clear(redis_url: str, peer: Peer) -> None:
    with Client(redis_url) as client:
        job_id = client.submit("silent")
        start = time.monotonic()
        with pytest.raises(ResultTimeoutError) as info:
            client.result(job_id, timeout=0.3)
        assert 0.3 <= time.monotonic() - start < 2.0
        assert isinstance(info.value, TimeoutError)
        assert (info.value.job_id, info.value.timeout) == (job_id, 0.3)
        assert str(info.value) == f"no result for job {job_id!r} within 0.3 s"


def test_result_past_its_timeout_reads_the_stored_result_when_the_reply_was_lost(
    redis_url: str, peer: Peer
) -> None:
    """What `headrace bulk` relies on when its reply entry is gone but the result is stored."""

    async def main(raw: aioredis.Redis) -> None:
        async with AsyncClient(redis_url) as client:
            job_id = await client.submit("silent")  # acked, never answered on the stream
            with pytest.raises(ResultTimeoutError):
                await client.result(job_id, timeout=0.2)
            await raw.set(KEYS.result(job_id), encode_result(Result(id=job_id, status="ok")))
            result = await client.result(job_id, timeout=0.2)
            assert (result.id, result.status, result.reused) == (job_id, "ok", False)

    asyncio.run(_with_raw(redis_url, main))


def test_an_id_is_an_idempotency_key_across_clients(redis_url: str) -> None:
    """A second submission of an id queues nothing and gets the first one's result, marked."""

    async def main(raw: aioredis.Redis) -> None:
        async with AsyncClient(redis_url) as first, AsyncClient(redis_url) as second:
            (a,) = await first.enqueue([{"id": "k", "prompt": "first"}])
            # Still queued (no worker yet): the claim, not the result, stops the second one.
            (b,) = await second.enqueue([{"id": "k", "prompt": "second", "stream": True}])
            assert (a.id, a.reused, b.id, b.reused, b.entry_id) == ("k", False, "k", True, None)
            assert a.entry_id is not None
            claim = (await raw.get(KEYS.submitted("k"))).decode().split(" ", 2)
            assert claim[1:] == [a.entry_id, first.reply_stream]  # [token, entry, reply_to]
            assert await raw.xlen(KEYS.requests) == 1
            with Peer(redis_url) as peer:
                mine = await first.result("k", timeout=10)
                theirs = [item async for item in second.stream("k", timeout=10)]
            assert (mine.text, mine.reused) == ("FIRST", False)
            assert [(r.status, r.text, r.reused) for r in theirs] == [("ok", "FIRST", True)]
            assert peer.seen == {"k": first.reply_stream}  # one run, for the first submitter

    asyncio.run(_with_raw(redis_url, main))


def test_an_id_with_a_stored_result_or_submitted_twice_is_not_run_again(
    redis_url: str, peer: Peer
) -> None:
    async def main(raw: aioredis.Redis) -> None:
        # A result stored by another producer (a raw XADD, no claim) also counts.
        await raw.set(KEYS.result("old"), encode_result(Result(id="old", status="ok", text="x")))
        async with AsyncClient(redis_url) as client:
            assert await client.submit("again", id="old") == "old"
            result = await client.result("old", timeout=10)
            assert (result.text, result.reused) == ("x", True)
            assert await client.submit("twice", id="t") == await client.submit("other", id="t")
            result = await client.result("t", timeout=10)
            assert (result.text, result.reused) == ("TWICE", True)  # the second queued nothing
            assert (await client.result("t", timeout=10)).reused  # asked again, same answer
            assert sorted(peer.seen) == ["t"]
            # A resubmission (of a job Redis lost) queues the claimed id again.
            (sub,) = await client.enqueue([{"id": "t", "prompt": "lost"}], resubmit=True)
            assert not sub.reused and sub.entry_id is not None
            assert await raw.xlen(KEYS.requests) == 2

    asyncio.run(_with_raw(redis_url, main))


def test_a_submission_sent_again_with_its_token_is_queued_once(redis_url: str) -> None:
    """A client library re-sending a pipeline after a dropped connection must not queue twice."""

    async def main(raw: aioredis.Redis) -> None:
        submitter = Submitter(raw, KEYS, claim_ttl_s=60)
        jobs = [Job(id=i, reply_to="r", prompt=i) for i in ("a", "b")]
        first = await submitter.send(jobs, tokens=["t1", "t2"])
        assert await submitter.send(jobs, tokens=["t1", "t2"]) == first
        assert await raw.xlen(KEYS.requests) == 2
        assert [s.reused for s in await submitter.send(jobs[:1], tokens=["t3"])] == [True]
        again = await submitter.send(jobs[:1], resubmit=True, tokens=["t4"])
        assert again[0].entry_id not in (None, first[0].entry_id)
        assert await raw.xlen(KEYS.requests) == 3
        assert 0 < await raw.ttl(KEYS.submitted("a")) <= 60

    asyncio.run(_with_raw(redis_url, main))


def test_locate_tells_done_queued_and_lost_jobs(redis_url: str) -> None:
    async def main(raw: aioredis.Redis) -> None:
        async with AsyncClient(redis_url) as client:
            subs = await client.enqueue({"id": i, "prompt": i} for i in "abcd")
            # No group yet (no worker ever ran): an entry in the stream is enough.
            assert await client.locate(subs) == dict.fromkeys("abcd", QUEUED)
            await raw.xgroup_create(KEYS.requests, KEYS.group, id="0")
            await raw.xreadgroup(KEYS.group, "w", {KEYS.requests: ">"}, count=2)  # a, b pending
            await raw.set(KEYS.result("a"), encode_result(Result(id="a", status="ok")))
            await raw.xdel(KEYS.requests, subs[1].entry_id, subs[2].entry_id)
            # b: only its pending entry is left; c: nothing at all.
            assert await client.locate(subs) == {"a": DONE, "b": QUEUED, "c": LOST, "d": QUEUED}
            await raw.flushall()  # no stream, no group: NOGROUP is not an error here
            assert await client.locate(subs) == dict.fromkeys("abcd", LOST)
            run_id = await client.server_run_id()
            assert len(run_id) == 40 and run_id == (await raw.info("server"))["run_id"]

    asyncio.run(_with_raw(redis_url, main))


def test_priority_routes_jobs_to_their_level_stream_and_locate_follows(redis_url: str) -> None:
    async def main(raw: aioredis.Redis) -> None:
        async with AsyncClient(redis_url) as client:
            jobs = [("hi", 3), ("zero", 0), ("lo", -2)]
            subs = await client.enqueue({"id": i, "prompt": i, "priority": p} for i, p in jobs)
            for sub, (job_id, priority) in zip(subs, jobs, strict=True):
                stream = KEYS.request_stream(priority)
                assert sub.stream == stream
                [(entry_id, fields)] = await raw.xrange(stream)
                assert entry_id.decode() == sub.entry_id
                assert decode_job(fields[JOB_FIELD.encode()], max_bytes=4096).id == job_id
            # Priority 0 goes exactly where it always went.
            assert KEYS.request_stream(0) == KEYS.requests == "headrace:requests"
            assert await client.locate(subs) == dict.fromkeys(["hi", "zero", "lo"], QUEUED)
            await raw.delete(KEYS.request_stream(3))
            assert (await client.locate(subs))["hi"] == LOST

    asyncio.run(_with_raw(redis_url, main))


async def _with_raw(redis_url: str, main) -> None:
    async with aioredis.Redis.from_url(redis_url) as raw:
        await main(raw)


def test_buffer_is_bounded_and_dropped_results_come_from_the_result_key(
    redis_url: str, peer: Peer
) -> None:
    async def main() -> None:
        async with AsyncClient(redis_url, max_buffered=2) as client:
            ids = await client.submit_many({"prompt": p, "id": p} for p in "abcde")
            assert (await client.result(ids[-1], timeout=10)).text == "E"
            assert len(client._live_router()._finals) <= 2  # private: the bound itself
            assert [(await client.result(i, timeout=10)).text for i in ids[:-1]] == list("ABCD")

    asyncio.run(main())


def test_close_fails_waiting_callers(redis_url: str, peer: Peer) -> None:
    async def main() -> None:
        client = await AsyncClient(redis_url).connect()
        job_id = await client.submit("silent")
        waiting = asyncio.create_task(client.result(job_id))
        await asyncio.sleep(0.1)
        await client.close()
        with pytest.raises(ClientClosedError):
            await waiting

    asyncio.run(main())


def test_result_of_a_foreign_id_comes_from_the_result_key(redis_url: str) -> None:
    async def main() -> None:
        async with AsyncClient(redis_url) as client, aioredis.Redis.from_url(redis_url) as raw:
            stored = encode_result(Result(id="elsewhere", status="ok", text="stored"))

            async def store_later() -> None:
                await asyncio.sleep(0.2)
                await raw.set(KEYS.result("elsewhere"), stored)

            task = asyncio.create_task(store_later())
            assert (await client.result("elsewhere", timeout=10)).text == "stored"
            await task
            with pytest.raises(TimeoutError):
                await client.result("nobody", timeout=0.2)

    asyncio.run(main())


def test_stream_yields_deltas_in_order_then_final(redis_url: str, peer: Peer) -> None:
    async def main() -> None:
        async with AsyncClient(redis_url) as client:
            job_id = await client.submit("streaming words", stream=True)
            items = [item async for item in client.stream(job_id, timeout=10)]
            assert [i.status for i in items] == ["partial"] * 15 + ["ok"]
            assert "".join(i.delta or "" for i in items) == items[-1].text == "STREAMING WORDS"
            plain = await client.submit("plain")
            assert [i.text async for i in client.stream(plain, timeout=10)] == ["PLAIN"]
            drained = await client.submit("drained", stream=True)
            assert (await client.result(drained, timeout=10)).text == "DRAINED"

    asyncio.run(main())


def test_reply_stream_gets_ttl_while_open_and_on_close(redis_url: str, peer: Peer) -> None:
    async def main() -> None:
        raw = aioredis.Redis.from_url(redis_url)
        client = await AsyncClient(redis_url, reply_ttl_s=120).connect()
        await client.generate("x", timeout=10)
        assert 0 < await raw.ttl(client.reply_stream) <= 120
        await raw.persist(client.reply_stream)  # e.g. recreated by a late XADD
        await client.close()
        assert 0 < await raw.ttl(client.reply_stream) <= 120
        with pytest.raises(ClientClosedError):
            await client.submit("after close")
        await raw.aclose()

    asyncio.run(main())


def test_cancel_sets_key_and_publishes(redis_url: str) -> None:
    async def main() -> None:
        async with AsyncClient(redis_url, cancel_ttl_s=300) as client:
            raw = aioredis.Redis.from_url(redis_url)
            pubsub = raw.pubsub()
            await pubsub.subscribe(KEYS.cancel_channel)
            await pubsub.get_message(timeout=1)  # subscribe confirmation
            await client.cancel("job-9")
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
            assert message is not None and message["data"] == b"job-9"
            assert 0 < await raw.ttl(KEYS.cancelled("job-9")) <= 300
            await pubsub.aclose()
            await raw.aclose()

    asyncio.run(main())


def test_bad_params_fail_before_anything_is_sent(redis_url: str) -> None:
    async def main() -> None:
        async with AsyncClient(redis_url) as client:
            with pytest.raises(RequestError) as info:
                await client.submit("x", temperature=-1)
            assert info.value.code == "invalid_params"
            with pytest.raises(ValueError):
                await client.submit("x", prompt_token_ids=[1])
            for bad in (0, -3, True, 2.5):
                with pytest.raises(RequestError, match="length_hint"):
                    await client.submit("x", length_hint=bad)
            assert await client._require().xlen(KEYS.requests) == 0

    asyncio.run(main())


def test_sync_client(redis_url: str, peer: Peer) -> None:
    with Client(redis_url) as client:
        assert client.generate("sync", timeout=10).text == "SYNC"
        ids = client.submit_many(
            [{"prompt": "one"}, {"prompt": "two", "params": {"max_tokens": 2}}]
        )
        assert [client.result(i, timeout=10).text for i in ids] == ["ONE", "TW"]
        job_id = client.submit("abc", stream=True)
        assert [i.delta or i.text for i in client.stream(job_id, timeout=10)] == [
            "A",
            "B",
            "C",
            "ABC",
        ]


def test_client_without_url_starts_embedded_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEADRACE_REDIS_URL", raising=False)
    with Client() as client:
        url = client.redis_url
        assert url is not None and url.startswith("redis://127.0.0.1:")
        assert not url.endswith(":6379")
        with Peer(url):
            assert client.generate("embedded", timeout=10).text == "EMBEDDED"
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()


def test_cli_submit(
    redis_url: str, peer: Peer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(*args: str) -> tuple[int, str, str]:
        code = cli_main(["submit", *args, "--redis-url", redis_url, "--timeout", "10"])
        out, err = capsys.readouterr()
        return code, out, err

    assert run("hello", "--max-tokens", "3") == (0, "HEL\n", "")
    assert run("hello", "--stream") == (0, "HELLO\n", "")
    messages = tmp_path / "m.json"
    messages.write_text(json.dumps([{"role": "user", "content": "from file"}]))
    assert run("--messages-file", str(messages)) == (0, "FROM FILE\n", "")
    code, _, err = run("fail")
    assert code == 1 and "error: internal: asked to fail" in err
    code, _, err = run("x", "--temperature", "-1")
    assert code == 2 and "invalid_params" in err


def test_cli_submit_timeout_cancels_and_needs_a_url(
    redis_url: str, peer: Peer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    code = cli_main(["submit", "silent", "--redis-url", redis_url, "--timeout", "0.3"])
    assert code == 1
    (job_id,) = peer.seen
    assert redis.Redis.from_url(redis_url).exists(KEYS.cancelled(job_id))
    assert f"error: no result for job {job_id!r} within 0.3 s" in capsys.readouterr().err
    # Without --timeout a default one applies (a job Redis lost must not hang the command).
    monkeypatch.setattr(worker.cli.submit, "DEFAULT_TIMEOUT_S", 0.2)
    started = time.monotonic()
    assert cli_main(["submit", "silent", "--stream", "--redis-url", redis_url]) == 1
    assert time.monotonic() - started < 5
    assert "within 0.2 s" in capsys.readouterr().err
    monkeypatch.delenv("HEADRACE_REDIS_URL", raising=False)
    assert cli_main(["submit", "hello"]) == 2


def test_length_hint_travels_with_the_job(redis_url: str, peer: Peer) -> None:
    async def main() -> None:
        async with AsyncClient(redis_url) as client:
            job_id = await client.submit("hello", length_hint=12, max_tokens=3)
            await client.result(job_id, timeout=10)
            [other] = await client.submit_many([{"prompt": "x", "length_hint": 5}])
            await client.result(other, timeout=10)
            assert peer.jobs[job_id].length_hint == 12 and peer.jobs[other].length_hint == 5

    asyncio.run(main())
