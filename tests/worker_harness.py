"""Helpers for the worker service tests: in-process and subprocess workers, raw stream I/O.

Jobs are written with `encode_job` + XADD and results read back with XRANGE, so
tests see exactly what is on the wire (every delta, every final result).
"""

from __future__ import annotations

import faulthandler
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import redis

from worker.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from worker.keys import JOB_FIELD, RESULT_FIELD, Keys
from worker.protocol import Job, Result, decode_result, encode_job
from worker.service.publish import Publisher
from worker.service.run import run_event_loop
from worker.service.settings import WorkerConfig
from worker.service.worker import WorkerService

REPO_ROOT = Path(__file__).resolve().parent.parent
KEYS = Keys()
REPLY = KEYS.reply("test")
MAX_MODEL_LEN = 1024


def engine_config(model_dir: Path, **scheduler: int) -> EngineConfig:
    """float32 tiny model, a small KV cache, one torch thread (2 shared cores)."""
    return EngineConfig(
        model=ModelConfig(str(model_dir), "float32", MAX_MODEL_LEN),
        cache=CacheConfig(block_size=16, num_blocks=512),
        scheduler=SchedulerConfig(
            **{"max_num_seqs": 8, "max_num_batched_tokens": 512, **scheduler}
        ),
        num_threads=1,
    )


def worker_config(redis_url: str, engine: EngineConfig, **overrides: Any) -> WorkerConfig:
    base = WorkerConfig(engine=engine, redis_url=redis_url, read_block_ms=50, claim_idle_ms=3000)
    return replace(base, **overrides)


def job(job_id: str, prompt: str = "Hello", reply_to: str = REPLY, **params: Any) -> Job:
    stream = bool(params.pop("stream", False))
    priority = int(params.pop("priority", 0))
    return Job(
        id=job_id, reply_to=reply_to, prompt=prompt, params=params, stream=stream, priority=priority
    )


def push(
    client: redis.Redis,
    jobs: Iterable[Job | bytes | dict[str, bytes]],
    stream: str = KEYS.requests,
) -> list[str]:
    """XADD each job (or raw payload, or raw entry fields) to a request stream (default: the
    default priority level's); returns the entry ids."""
    pipe = client.pipeline(transaction=False)
    for item in jobs:
        if isinstance(item, dict):
            pipe.xadd(stream, item)
        else:
            payload = item if isinstance(item, bytes) else encode_job(item)
            pipe.xadd(stream, {JOB_FIELD: payload})
    return [eid.decode() for eid in pipe.execute()]


def results(client: redis.Redis, stream: str = REPLY) -> list[Result]:
    """Every result on a reply stream, in order (deltas and finals)."""
    return [
        decode_result(fields[RESULT_FIELD.encode()])
        for _, fields in client.xrange(stream)
        if RESULT_FIELD.encode() in fields
    ]


def finals(client: redis.Redis, stream: str = REPLY) -> dict[str, list[Result]]:
    """Final results per job id (a list, so duplicates would show)."""
    out: dict[str, list[Result]] = {}
    for result in results(client, stream):
        if result.final:
            out.setdefault(result.id, []).append(result)
    return out


def standalone_publisher(aclient: Any, result_ttl_s: int) -> Publisher:
    """A Publisher outside a worker (worker "w", no metrics, acks ignored), for tests that
    drive the publish path directly; run its `run()` as a task."""
    return Publisher(
        aclient,
        KEYS,
        worker="w",
        result_ttl_s=result_ttl_s,
        reply_maxlen=100,
        on_acked=lambda state: None,
    )


def pending_count(client: redis.Redis) -> int:
    return int(client.xpending(KEYS.requests, KEYS.group)["pending"])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class InProcessWorker:
    """A WorkerService on its own event loop thread (uvloop), sharing a prebuilt engine."""

    def __init__(self, config: WorkerConfig, engine: Any) -> None:
        self.service = WorkerService(config, engine)
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="test-worker", daemon=True)

    def _main(self) -> None:
        try:
            self.exit_code = run_event_loop(self.service.run())
        except BaseException as exc:  # surfaced by join()
            self.error = exc

    def start(self) -> InProcessWorker:
        self._thread.start()
        wait_for(
            lambda: self.service.ready.is_set() or not self._thread.is_alive(), 30, "worker start"
        )
        if self.error is not None:
            raise self.error
        assert self.service.ready.is_set(), f"worker exited with {self.exit_code} before ready"
        return self

    def join(self, timeout: float = 60) -> int:
        self._thread.join(timeout)
        if self._thread.is_alive():
            faulthandler.dump_traceback(all_threads=True)
            for task in self.service.supervisor.tasks:
                task.print_stack()
        assert not self._thread.is_alive(), "worker did not stop"
        if self.error is not None:
            raise self.error
        assert self.exit_code is not None
        return self.exit_code

    def stop(self, timeout: float = 60) -> int:
        self.service.request_stop()
        return self.join(timeout)

    def __enter__(self) -> InProcessWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self.service.request_stop(force=True)
            self._thread.join(30)


def spawn_worker(
    redis_url: str | None, model_dir: Path, log_path: Path, *flags: str, new_session: bool = False
) -> subprocess.Popen[bytes]:
    """`python -m worker.cli worker ...` as a child process, logging to `log_path`.

    redis_url None → the worker starts its embedded Redis. new_session → its own
    process group, so a test can deliver a terminal's Ctrl-C (SIGINT to the group).
    """
    args = [
        sys.executable, "-m", "worker.cli", "worker",
        "--model", str(model_dir),
        "--dtype", "float32",
        "--max-model-len", str(MAX_MODEL_LEN),
        "--num-kv-blocks", "512",
        "--num-threads", "1",
        "--read-block-ms", "50",
        *(("--redis-url", redis_url) if redis_url else ()),
        *flags,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            args,
            cwd=REPO_ROOT,
            env=env,
            stdout=log_file,
            stderr=log_file,
            start_new_session=new_session,
        )


def consumer_alive(client: redis.Redis, consumer: str) -> bool:
    """The worker's first heartbeat is written once it is ready to read."""
    return bool(client.hexists(KEYS.workers, consumer))
