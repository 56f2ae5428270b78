"""Priority end to end: a high-priority job overtakes a backlog, every level's stream is served.

A real redis-server and the tiny llama in an in-process worker (max_num_seqs 8, so
16 jobs held at most). Queue waits are compared as ratios and counts of jobs that
started first, never against a number of seconds (the machine is shared).
"""

from __future__ import annotations

import json
import statistics

import pytest

from tests.worker_harness import (
    KEYS,
    REPLY,
    InProcessWorker,
    finals,
    job,
    push,
    wait_for,
    worker_config,
)
from worker.cli import main as cli_main
from worker.service.publish import entry_time_ms

BACKLOG = 1000
TINY = {"max_tokens": 2, "ignore_eos": True, "temperature": 0.0}


@pytest.mark.slow
def test_a_high_priority_job_overtakes_a_thousand_queued_jobs(engine, redis_url, client):
    backlog = push(client, [job(f"q{i}", f"Item {i}", **TINY) for i in range(BACKLOG)])
    config = worker_config(redis_url, engine.config)
    with InProcessWorker(config, engine) as worker:
        # Submitted once the worker is busy with the backlog (100 done, ~900 still queued).
        wait_for(lambda: client.xlen(REPLY) >= 100, 120, "the first 100 results")
        urgent = job("urgent", "Now!", priority=1, **TINY)
        [urgent_entry] = push(client, [urgent], KEYS.request_stream(1))
        got = wait_for(
            lambda: f if len(f := finals(client)) == BACKLOG + 1 else None, 300, "every result"
        )
        held = worker.service.config.inflight_limit
        assert worker.stop() == 0
    assert all(len(v) == 1 and v[0].status == "ok" for v in got.values())

    # A job's queue wait: enqueue (its entry id) to its first token.
    def started_ms(job_id: str, entry_id: str) -> float:
        return entry_time_ms(entry_id) + got[job_id][0].timings["ttft_ms"]

    urgent_queued, urgent_started = entry_time_ms(urgent_entry), started_ms("urgent", urgent_entry)
    starts = [started_ms(f"q{i}", eid) for i, eid in enumerate(backlog)]
    # Backlog jobs that started while the urgent one waited: those the worker held already
    # (read before it was submitted: at most `held`) and those admitted in the same engine
    # step as it (max_num_seqs - 1 at most); none of the ~900 still queued in Redis.
    overtaking = [s for s in starts if urgent_queued < s < urgent_started]
    max_num_seqs = engine.config.scheduler.max_num_seqs
    assert len(overtaking) <= held + max_num_seqs - 1, (len(overtaking), held)
    # Its wait is a small fraction of the backlog's median wait (~500 jobs' worth of steps).
    low_waits = [got[f"q{i}"][0].timings["ttft_ms"] for i in range(BACKLOG)]
    urgent_wait = got["urgent"][0].timings["ttft_ms"]
    assert urgent_wait * 10 < statistics.median(low_waits), (urgent_wait, low_waits[::100])
    # The metrics tell the levels apart.
    registry, name = (
        worker.service.metrics.registry,
        "headrace_priority_queue_wait_seconds_count",
    )
    assert registry.get_sample_value(name, {"priority": "high"}) == 1
    assert registry.get_sample_value(name, {"priority": "default"}) == BACKLOG
    assert worker.service.stats()["finished"] == BACKLOG + 1


def test_every_level_stream_is_served_and_stats_show_the_levels(engine, redis_url, client, capsys):
    push(client, [job("d0", **TINY)])
    push(client, [job("h0", priority=2, **TINY)], KEYS.request_stream(2))
    push(client, [job("l0", priority=-1, **TINY)], KEYS.request_stream(-1))
    # Before any worker: stats list the other levels' streams with what waits there.
    assert cli_main(["stats", "--redis-url", redis_url, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["length"] == 1 and stats["stream"] == KEYS.requests
    assert {lv["stream"]: lv["lag"] for lv in stats["levels"]} == {
        KEYS.request_stream(1): 1,
        KEYS.request_stream(-1): 1,
    }
    config = worker_config(redis_url, engine.config, burst=True)
    with InProcessWorker(config, engine) as worker:
        assert worker.join() == 0
    got = finals(client)
    assert sorted(got) == ["d0", "h0", "l0"] and all(v[0].status == "ok" for v in got.values())
    # Acked and deleted from its own stream, nothing pending anywhere.
    for stream in KEYS.request_streams:
        assert client.xlen(stream) == 0, stream
        assert client.xpending(stream, KEYS.group)["pending"] == 0, stream


def test_a_duplicate_in_another_level_is_deleted_with_the_running_copy_result(
    engine, redis_url, client
):
    high = KEYS.request_stream(1)
    long = {"max_tokens": 300, "ignore_eos": True, "temperature": 0.0}
    with InProcessWorker(worker_config(redis_url, engine.config), engine) as worker:
        push(client, [job("twice", "Once upon a time", **long)])
        inflight = worker.service.inflight
        wait_for(lambda: "twice" in inflight and inflight["twice"].running, 30, "twice running")
        # The same id resubmitted at high priority: acked at once, kept until the final result.
        push(client, [job("twice", "Once upon a time", priority=1, **long)], high)
        wait_for(
            lambda: client.xlen(high) == 1 and client.xpending(high, KEYS.group)["pending"] == 0,
            10,
            "the duplicate acked",
        )
        assert "twice" not in finals(client), "must still run for this check"
        wait_for(lambda: "twice" in finals(client), 60, "the final result")
        wait_for(lambda: client.xlen(high) + client.xlen(KEYS.requests) == 0, 10, "both deleted")
    assert len(finals(client)["twice"]) == 1
