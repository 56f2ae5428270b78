"""Observability of a running worker: /metrics scraped over HTTP, /healthz, /readyz, logs, stats hash.

A real redis-server, a real engine (tiny llama, float32) and real HTTP requests;
the worker runs in-process (shared engine) except for the JSON-log check, which
starts `headrace worker` as a child to prove the flag/env wiring end to end.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.worker_harness import (
    MAX_MODEL_LEN,
    REPO_ROOT,
    InProcessWorker,
    finals,
    job,
    push,
    wait_for,
    worker_config,
)
from worker.cli import main as cli_main
from worker.service.logs import JsonFormatter
from worker.service.metrics import Health, Metrics, MetricsServer

GREEDY = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page: (name, sorted labels) → value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_running_worker_exports_metrics_health_stats_and_logs(
    engine, redis_url, client, caplog, capsys
):
    port = free_port()
    config = worker_config(
        redis_url,
        engine.config,
        metrics_port=port,
        metrics_host="127.0.0.1",
        throughput_log_s=0.5,
        heartbeat_interval_s=0.5,
    )
    caplog.set_level(logging.DEBUG, logger="worker.service.metrics")
    with InProcessWorker(config, engine) as worker:
        assert get(port, "/healthz")[0] == 200
        wait_for(lambda: get(port, "/readyz")[0] == 200, 10, "readiness")
        ready = json.loads(get(port, "/readyz")[1])
        assert ready == {"ok": True, "model_loaded": True, "redis": True, "loop": True,
                         "stopping": False}  # fmt: skip
        prompts = ["Hello", "The capital of France is", "One two three", "Write a poem"]
        jobs = [job(f"j{i}", p, **GREEDY) for i, p in enumerate(prompts)]
        push(client, [*jobs, job("bad", "Hi", max_tokens=-1)])
        got = wait_for(lambda: f if len(f := finals(client)) == 5 else None, 60, "5 results")
        ok = [r[0] for r in got.values() if r[0].status == "ok"]
        assert len(ok) == 4 and got["bad"][0].status == "error"

        metrics = samples(get(port, "/metrics")[1])
        for name in (
            "headrace_time_to_first_token_seconds",
            "headrace_time_per_output_token_seconds",
            "headrace_e2e_request_latency_seconds",
            "headrace_request_queue_time_seconds",
        ):
            assert metrics[(f"{name}_count", ())] == 4, name
            assert metrics[(f"{name}_sum", ())] > 0, name
        assert metrics[("headrace_requests_total", (("status", "ok"),))] == 4
        # Queue wait by priority level: all four ran at the default level; none high or low.
        wait = "headrace_priority_queue_wait_seconds"
        assert metrics[(f"{wait}_count", (("priority", "default"),))] == 4
        assert (f"{wait}_count", (("priority", "high"),)) not in metrics
        assert ("headrace_preemptions_total", ()) in metrics
        assert metrics[("headrace_requests_total", (("status", "error"),))] == 1
        assert metrics[("headrace_generation_tokens_total", ())] == 4 * GREEDY["max_tokens"]
        prompt_tokens = sum(r.usage["prompt_tokens"] for r in ok)
        assert metrics[("headrace_prompt_tokens_total", ())] == prompt_tokens
        assert metrics[("headrace_engine_steps_total", ())] >= GREEDY["max_tokens"]
        assert metrics[("headrace_num_requests_running", ())] == 0
        assert metrics[("headrace_num_requests_waiting", ())] == 0
        blocks = engine.stats().num_total_blocks
        assert metrics[("headrace_kv_blocks_free", ())] == blocks
        assert metrics[("headrace_kv_blocks_used", ())] == 0
        assert ("headrace_step_tokens", ()) in metrics
        assert ("headrace_jobs_inflight", ()) in metrics
        assert 0 <= metrics[("headrace_prefix_cache_hit_ratio", ())] <= 1

        # The heartbeat publishes the same totals for `headrace stats`.
        wait_for(lambda: worker.service.stats()["finished"] == 5, 10, "totals")
        consumer = config.consumer

        def reported() -> dict | None:
            assert cli_main(["stats", "--redis-url", redis_url, "--json"]) == 0
            stats = json.loads(capsys.readouterr().out)
            rows = {c["name"]: c for c in stats["consumers"]}
            row = rows.get(consumer)
            done = row and row["alive"] and (row["worker"] or {}).get("finished") == 5
            return stats if done else None

        stats = wait_for(reported, 10, "worker stats in redis", poll=0.2)
        assert stats["live_workers"] == 1 and stats["recent_tok_s"] > 0
        assert stats["pending"] == 0
        assert stats["prefix_cache_hit_ratio"] is not None  # the worker reports its cache

        def throughput() -> list[float]:
            lines = [r.getMessage() for r in caplog.records if "throughput:" in r.getMessage()]
            return [float(re.search(r"([\d.]+) tok/s generated", m).group(1)) for m in lines]

        assert max(wait_for(throughput, 10, "throughput line")) > 0
    job_lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert sum(m.startswith("job j") and " ok " in m for m in job_lines) == 4
    assert any(m.startswith("job bad error finish=invalid_params") for m in job_lines)


def test_health_endpoints_answer_503_until_ready(redis_url):
    health = Health(stale_after_s=5)
    server = MetricsServer(Metrics(), health, "127.0.0.1", 0).start()
    try:
        status, body = get(server.port, "/readyz")
        assert status == 503 and json.loads(body)["model_loaded"] is False
        health.model_loaded = True
        health.redis_reachable(True)
        assert get(server.port, "/readyz")[0] == 200
        health.stopping = True  # draining: take no new traffic
        assert get(server.port, "/readyz")[0] == 503
        assert get(server.port, "/healthz")[0] == 200
        health.task_died("heartbeat")  # a background task died: the worker is going down
        status, body = get(server.port, "/healthz")
        assert status == 503 and json.loads(body)["dead_tasks"] == ["heartbeat"]
        health.dead_tasks = frozenset()
        assert get(server.port, "/healthz")[0] == 200
        health.stale_after_s = 0  # the event loop stopped beating
        assert get(server.port, "/healthz")[0] == 503
        assert get(server.port, "/nope")[0] == 404
        assert "# HELP headrace_requests_total" in get(server.port, "/metrics")[1]
    finally:
        server.stop()


def test_json_formatter_keeps_extras_and_tracebacks():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("t").makeRecord(
            "t", logging.ERROR, __file__, 1, "job %s failed", ("j1",), sys.exc_info(),
            extra={"job_id": "j1"},
        )  # fmt: skip
    line = JsonFormatter().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert (out["level"], out["logger"], out["message"], out["job_id"]) == (
        "ERROR",
        "t",
        "job j1 failed",
        "j1",
    )
    assert "ValueError: boom" in out["exc_info"]


@pytest.mark.slow
def test_worker_cli_logs_json_and_serves_metrics_from_env(model_dir, redis_url, client, tmp_path):
    push(client, [job("e1", "Hello", **GREEDY)])
    port = free_port()
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO_ROOT),
        HEADRACE_LOG_FORMAT="json",
        HEADRACE_METRICS_PORT=str(port),
        HEADRACE_METRICS_HOST="127.0.0.1",
    )
    args = [
        sys.executable, "-m", "worker.cli", "--log-level", "DEBUG", "worker",
        "--redis-url", redis_url, "--model", str(model_dir), "--dtype", "float32",
        "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "64", "--num-threads", "1",
        "--read-block-ms", "50", "--burst",
    ]  # fmt: skip
    run = subprocess.run(args, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert finals(client)["e1"][0].status == "ok"
    records = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    messages = [r["message"] for r in records]
    assert any(m.startswith(f"metrics on http://127.0.0.1:{port}/metrics") for m in messages)
    assert any(m.startswith("job e1 ok finish=length") for m in messages)
    # Nothing went out in the text format.
    text_lines = [ln for ln in run.stderr.splitlines() if re.match(r"\d{4}-\d\d-\d\d ", ln)]
    assert not text_lines, text_lines[:3]


def test_preemptions_and_recomputed_tokens_are_counted_from_engine_stats():
    from prometheus_client import generate_latest

    from worker.engine.engine import EngineStats

    metrics = Metrics()
    base = dict(num_running=1, num_waiting=0, num_free_blocks=3, num_total_blocks=8)
    for preemptions, recomputed in ((1, 40), (3, 100), (3, 100)):
        metrics.observe_step(
            EngineStats(
                **base,
                block_size=16,
                num_preemptions=preemptions,
                num_batched_tokens=1,
                num_recomputed_tokens=recomputed,
            )
        )
    page = samples(generate_latest(metrics.registry).decode())
    assert page[("headrace_preemptions_total", ())] == 3
    assert page[("headrace_recomputed_tokens_total", ())] == 100
