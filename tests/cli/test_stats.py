"""`headrace stats` against a real redis-server holding queued, pending and dead-lettered jobs."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
import redis
import redis.asyncio as aioredis

from worker.cli import main as cli_main
from worker.cli.stats import collect
from worker.errors import RequestError
from worker.keys import JOB_FIELD, Keys
from worker.protocol import Job, encode_job
from worker.service.metrics import Metrics
from worker.service.recovery import Entry, Recovery

KEYS = Keys()


@pytest.fixture
def client(redis_url: str):
    conn = redis.Redis.from_url(redis_url)
    yield conn
    conn.close()


def run_stats(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli_main(["stats", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def heartbeat(redis_url: str, consumer: str, stats: dict) -> None:
    """What a live worker writes each heartbeat: its stats hash entry and liveness key."""

    async def beat() -> None:
        conn = aioredis.Redis.from_url(redis_url)
        try:
            recovery = Recovery(
                conn,
                KEYS,
                consumer,
                claim_idle_ms=30_000,
                max_attempts=3,
                liveness_ttl_s=30,
                held=tuple,
            )
            await recovery.heartbeat([], stats)
        finally:
            await conn.aclose()

    asyncio.run(beat())


def dead_letter(client: redis.Redis, entry_id: str, payload: bytes) -> None:
    recovery = Recovery(
        None, KEYS, "w-live", claim_idle_ms=1, max_attempts=1, liveness_ttl_s=1, held=tuple
    )
    error = RequestError("max_attempts_exceeded", "delivered 2 times")
    client.xadd(
        KEYS.dead_letter,
        recovery.dead_letter_fields(Entry(KEYS.requests, entry_id, payload, 2), error),
    )


def test_stats_reports_queue_pending_dead_letters_and_throughput(redis_url, client, capsys):
    payloads = [encode_job(Job(id=f"j{i}", reply_to="r", prompt="hi")) for i in range(6)]
    ids = [client.xadd(KEYS.requests, {JOB_FIELD: p}).decode() for p in payloads]
    client.xgroup_create(KEYS.requests, KEYS.group, id="0")
    # A crashed worker holding two jobs (no liveness key) and a live one holding one.
    client.xreadgroup(KEYS.group, "w-dead", {KEYS.requests: ">"}, count=2)
    client.xreadgroup(KEYS.group, "w-live", {KEYS.requests: ">"}, count=1)
    metrics = Metrics(rate_window_s=60)
    metrics.tick(inflight=1)
    metrics.add_generation_tokens(120)
    metrics.add_prompt_tokens(30)
    metrics.tick(inflight=1)
    report = metrics.snapshot()
    assert report["recent_tok_s"] > 0
    heartbeat(redis_url, "w-live", {"consumer": "w-live", **report})
    dead_letter(client, ids[0], payloads[0])
    dead_letter(client, "1-1", b"\xc1 not msgpack")

    code, out, err = run_stats(capsys, "--redis-url", redis_url, "--json")
    assert code == 0, err
    stats = json.loads(out)
    assert stats["length"] == 6
    assert stats["lag"] == 3  # never delivered
    assert stats["pending"] == 3
    assert stats["dead_letter"] == 2
    assert stats["oldest_waiting_s"] is not None and stats["oldest_pending_s"] is not None
    consumers = {c["name"]: c for c in stats["consumers"]}
    assert {n: (c["pending"], c["alive"]) for n, c in consumers.items()} == {
        "w-dead": (2, False),
        "w-live": (1, True),
    }
    assert consumers["w-live"]["worker"]["generation_tokens"] == 120
    assert consumers["w-dead"]["worker"] is None
    assert stats["live_workers"] == 1
    assert stats["recent_tok_s"] == pytest.approx(report["recent_tok_s"], abs=0.01)

    code, text, _ = run_stats(capsys, "--redis-url", redis_url)
    assert code == 0
    assert "6 entries, 3 waiting, 3 pending" in text
    assert f"{KEYS.dead_letter}: 2 entries" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("  w-")}
    assert rows["w-dead"][1:3] == ["no", "2"]
    assert rows["w-live"][1:3] == ["yes", "1"]
    assert rows["w-live"][-2] == f"{report['recent_tok_s']:.1f}"


def test_stats_on_an_empty_namespace(redis_url, capsys):
    code, out, _ = run_stats(capsys, "--redis-url", redis_url, "--namespace", "empty", "--json")
    assert code == 0
    stats = json.loads(out)
    assert (stats["length"], stats["pending"], stats["dead_letter"]) == (0, 0, 0)
    assert stats["consumers"] == [] and stats["oldest_waiting_s"] is None
    code, text, _ = run_stats(capsys, "--redis-url", redis_url, "--namespace", "empty")
    assert code == 0 and "no consumers yet" in text


def test_stats_before_any_worker_created_the_group(redis_url, client, capsys):
    for i in range(3):
        client.xadd(KEYS.requests, {JOB_FIELD: encode_job(Job(id=f"q{i}", reply_to="r"))})
    code, out, _ = run_stats(capsys, "--redis-url", redis_url, "--json")
    stats = json.loads(out)
    assert code == 0 and (stats["length"], stats["lag"], stats["pending"]) == (3, 3, 0)


def test_stats_lag_when_redis_cannot_tell_it_after_a_deleted_entry(redis_url, client):
    ids = [client.xadd(KEYS.requests, {JOB_FIELD: b"x"}).decode() for _ in range(3)]
    client.xgroup_create(KEYS.requests, KEYS.group, id="0")
    client.xreadgroup(KEYS.group, "w", {KEYS.requests: ">"}, count=2)
    # What a worker does with a finished job: ack, then delete (the last delivered entry).
    client.xack(KEYS.requests, KEYS.group, ids[1])
    client.xdel(KEYS.requests, ids[1])
    [group] = client.xinfo_groups(KEYS.requests)
    assert group["lag"] is None  # Redis 7: a tombstone at the last delivered id
    stats = collect(client, KEYS)
    assert (stats.length, stats.pending, stats.lag) == (2, 1, 1)


def test_stats_unreachable_redis_fails_plainly(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    code, out, err = run_stats(capsys, "--redis-url", f"redis://ops:s3cret@127.0.0.1:{port}/0")
    assert code == 1 and out == ""
    assert "cannot read stats" in err
    assert "s3cret" not in err and "ops:***@127.0.0.1" in err  # the password never shows
