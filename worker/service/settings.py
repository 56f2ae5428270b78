"""Settings stage: WorkerConfig, the `headrace worker` service knobs as one frozen dataclass.

Built at the edge from flags and `HEADRACE_*` variables (`worker.cli.options`, the one
option table) and passed down; the service never reads the environment itself.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, field, replace

from worker.config import EngineConfig
from worker.keys import Keys
from worker.protocol import DEFAULT_MAX_PAYLOAD_BYTES
from worker.redis_url import DEFAULT_TIMEOUT_S, keys_for
from worker.service.logs import LOG_FORMATS


def default_consumer_name() -> str:
    """hostname-pid-random: unique per process, readable in XPENDING / XINFO output."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one worker process needs; built once at the edge and passed down.

    redis_url: None → start an embedded redis-server and print its URL.
    max_inflight: jobs read from Redis but not yet acked (running + waiting + tokenizing);
        None → 2 × the engine's max_num_seqs, so the next batch is always at hand.
    claim_idle_ms: a pending entry idle this long belongs to a dead consumer and is reclaimed.
    heartbeat_interval_s: how often live claims are refreshed; None → claim_idle_ms / 3.
    max_attempts: deliveries after which a job goes to the dead-letter stream.
    redis_timeout_s: seconds a Redis reply may take (beyond XREADGROUP's BLOCK) before the
        connection counts as dead and the call is retried on a new one.
    burst: process what is queued (and reclaimable), then exit.
    metrics_port: serve /metrics, /healthz and /readyz on this port; 0 → no HTTP server.
    log_format: "text" or "json" (one object a line, for log collectors).
    read_shards: the request-stream shards this worker reads (empty: all; worker/keys.py).
    """

    engine: EngineConfig = field(default_factory=EngineConfig)
    redis_url: str | None = None
    namespace: str = "headrace"
    consumer: str = field(default_factory=default_consumer_name)
    max_inflight: int | None = None
    read_block_ms: int = 500
    claim_idle_ms: int = 30_000
    heartbeat_interval_s: float | None = None
    max_attempts: int = 3
    redis_timeout_s: float = DEFAULT_TIMEOUT_S
    result_ttl_s: int = 24 * 3600
    reply_maxlen: int = 100_000
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    drain_timeout_s: float = 30.0
    burst: bool = False
    tokenizer_threads: int = 1
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    log_format: str = "text"
    throughput_log_s: float = 10.0
    read_shards: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _ = self.keys  # validates the namespace and the URL's shards
        if not self.consumer:
            raise ValueError("consumer name must be non-empty")
        if self.inflight_limit < 1 or self.max_attempts < 1 or self.tokenizer_threads < 1:
            raise ValueError("max_inflight, max_attempts and tokenizer_threads must be >= 1")
        if self.claim_idle_ms < 1 or self.read_block_ms < 1:
            raise ValueError("claim_idle_ms and read_block_ms must be >= 1")
        if self.redis_timeout_s <= 0:
            raise ValueError("redis_timeout must be > 0")
        # A live worker whose refresh comes later than the reclaim threshold loses its jobs.
        if not 0 < self.heartbeat_s * 1000 < self.claim_idle_ms:
            raise ValueError("heartbeat interval must be shorter than claim_idle_ms")
        if self.result_ttl_s < 1 or self.max_payload_bytes < 1 or self.drain_timeout_s < 0:
            raise ValueError("result_ttl, max_payload_bytes must be >= 1 and drain_timeout >= 0")
        if not 0 <= self.metrics_port <= 65535 or self.throughput_log_s <= 0:
            raise ValueError("metrics_port must be in [0, 65535] and throughput_log_s > 0")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {LOG_FORMATS}")

    @property
    def inflight_limit(self) -> int:
        """max_inflight, or 2 × max_num_seqs when unset (derived here so `replace` stays right)."""
        if self.max_inflight is not None:
            return self.max_inflight
        return 2 * self.engine.scheduler.max_num_seqs

    @property
    def heartbeat_s(self) -> float:
        """heartbeat_interval_s, or claim_idle_ms / 3 when unset."""
        if self.heartbeat_interval_s is not None:
            return self.heartbeat_interval_s
        return self.claim_idle_ms / 3000.0

    @property
    def keys(self) -> Keys:
        """The namespace's key layout on `redis_url`'s deployment (its `shards`)."""
        return replace(keys_for(self.redis_url, self.namespace), reading=self.read_shards)
