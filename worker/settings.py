"""WorkerConfig: the `headrace worker` service knobs, from flags and `HEADRACE_*` environment.

Flags override the environment, the environment overrides the defaults, so a
compose file can set everything with env vars and a person can still override
one knob on the command line.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from worker.config import (
    ADMISSION_POLICIES,
    DTYPES,
    KV_CACHE_DTYPES,
    QUANTIZATIONS,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
)
from worker.keys import Keys
from worker.logs import LOG_FORMATS
from worker.protocol import DEFAULT_MAX_PAYLOAD_BYTES
from worker.redis_url import DEFAULT_TIMEOUT_S

ENV_PREFIX = "HEADRACE_"


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

    def __post_init__(self) -> None:
        Keys(self.namespace)  # validates the namespace
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
        return Keys(self.namespace)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerConfig:
        return _build({}, os.environ if env is None else env)

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, env: Mapping[str, str] | None = None
    ) -> WorkerConfig:
        """Flags given on the command line win over `HEADRACE_*` variables."""
        flags = {opt.dest: getattr(args, opt.dest, None) for opt in OPTIONS}
        return _build(flags, os.environ if env is None else env)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


@dataclass(frozen=True)
class Option:
    """One knob: flag `--dest-with-dashes`, env `HEADRACE_DEST`, parsed by `parse`."""

    dest: str
    parse: Callable[[str], Any]
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")

    @property
    def no_flag(self) -> str:
        """`--no-dest-with-dashes`: a switch's off form."""
        return "--no-" + self.dest.replace("_", "-")

    @property
    def is_switch(self) -> bool:
        """An on/off option: `--flag` / `--no-flag` on the command line."""
        return self.parse is _parse_bool

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


OPTIONS: tuple[Option, ...] = (
    Option("redis_url", str, "Redis URL; unset → start an embedded redis-server"),
    Option("namespace", str, "key prefix shared by producers and workers (default headrace)"),
    Option("consumer", str, "consumer name in the group (default hostname-pid-random)"),
    Option("model", str, "model directory, hub id, .gguf file or alias (default smollm2)"),
    Option("dtype", str, "weights and KV cache dtype", DTYPES),
    Option("max_model_len", int, "context length (default: the model's)"),
    Option("quantization", str, "weight quantization applied at load", QUANTIZATIONS),
    Option("kv_cache_memory", float, "KV cache size in GiB"),
    Option(
        "kv_cache_dtype",
        str,
        "KV cache storage: int8 (default) or auto (model dtype)",
        KV_CACHE_DTYPES,
    ),
    Option("num_kv_blocks", int, "KV cache size in blocks (overrides --kv-cache-memory)"),
    Option("block_size", int, "tokens per KV cache block"),
    Option(
        "prefix_caching",
        _parse_bool,
        "reuse the KV pages of prompt prefixes computed before (default on)",
    ),
    Option("max_num_seqs", int, "sequences per batch"),
    Option("max_num_batched_tokens", int, "tokens per forward pass"),
    Option(
        "admission",
        str,
        "fcfs (default): admit while the next chunk fits; predicted: admit when prompt + "
        "predicted output fit beside the running sequences' predicted need (fewer preemptions)",
        ADMISSION_POLICIES,
    ),
    Option("seed", int, "engine seed"),
    Option("num_threads", int, "torch CPU threads"),
    Option(
        "enforce_eager",
        _parse_bool,
        "run every step eagerly (default off: CUDA-graph decode steps on CUDA; never on CPU)",
    ),
    Option("max_inflight", int, "jobs held (read, not yet acked); default 2 × max-num-seqs"),
    Option(
        "priority_aging",
        float,
        "seconds of waiting that raise a job's priority by one, so none starves (default 60)",
    ),
    Option("max_attempts", int, "deliveries before a job goes to the dead-letter stream"),
    Option("claim_idle_ms", int, "reclaim pending jobs of consumers silent this long"),
    Option("heartbeat_interval", float, "seconds between claim refreshes"),
    Option("read_block_ms", int, "XREADGROUP BLOCK time"),
    Option("redis_timeout", float, "seconds a Redis reply may take before reconnecting"),
    Option("result_ttl", int, "seconds a final result stays fetchable by id"),
    Option("max_payload_bytes", int, "largest accepted job payload"),
    Option("drain_timeout", float, "seconds to finish in-flight jobs on SIGTERM"),
    Option("burst", _parse_bool, "process what is queued, then exit"),
    Option("tokenizer_threads", int, "threads that tokenize prompts"),
    Option("metrics_port", int, "Prometheus /metrics, /healthz, /readyz port (0 = off)"),
    Option(
        "metrics_host",
        str,
        "address the metrics server binds (default 127.0.0.1; 0.0.0.0 to be scraped from elsewhere)",
    ),
    Option("log_format", str, "text, or json for one JSON object a line", LOG_FORMATS),
)

# Option dest → WorkerConfig field, for the knobs that are not engine settings.
_WORKER_FIELDS = {
    "redis_url": "redis_url",
    "namespace": "namespace",
    "consumer": "consumer",
    "max_inflight": "max_inflight",
    "max_attempts": "max_attempts",
    "claim_idle_ms": "claim_idle_ms",
    "heartbeat_interval": "heartbeat_interval_s",
    "read_block_ms": "read_block_ms",
    "redis_timeout": "redis_timeout_s",
    "result_ttl": "result_ttl_s",
    "max_payload_bytes": "max_payload_bytes",
    "drain_timeout": "drain_timeout_s",
    "burst": "burst",
    "tokenizer_threads": "tokenizer_threads",
    "metrics_port": "metrics_port",
    "metrics_host": "metrics_host",
    "log_format": "log_format",
}


def add_arguments(parser: Any, options: Iterable[Option] = OPTIONS) -> None:
    """Add each option as a flag defaulting to None (None = not given → env or default).

    parser: an ArgumentParser or an argument group; options: all of OPTIONS, or the subset a
    verb exposes (bulk's local worker).
    """
    for opt in options:
        if opt.is_switch:
            parser.add_argument(
                opt.flag,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{opt.help} [env {opt.env}]",
            )
            continue
        parser.add_argument(
            opt.flag,
            type=opt.parse,
            default=None,
            choices=opt.choices,
            help=f"{opt.help} [env {opt.env}]",
        )


def _build(flags: Mapping[str, Any], env: Mapping[str, str]) -> WorkerConfig:
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        if flags.get(opt.dest) is not None:
            values[opt.dest] = flags[opt.dest]
        elif env.get(opt.env):
            try:
                values[opt.dest] = opt.parse(env[opt.env])
            except ValueError as exc:
                raise ValueError(f"{opt.env}: {exc}") from None
            if opt.choices and values[opt.dest] not in opt.choices:
                raise ValueError(f"{opt.env} must be one of {opt.choices}")
    worker = {f: values[d] for d, f in _WORKER_FIELDS.items() if d in values}
    return WorkerConfig(engine=_engine_config(values), **worker)


# Engine settings whose worker default differs from the engine's: the int8 KV cache holds
# ~1.9x the tokens (more concurrent sequences) within the accuracy targets (README, `headrace
# eval`); `--kv-cache-dtype auto` keeps the model dtype.
WORKER_ENGINE_DEFAULTS: dict[str, Any] = {"kv_cache_dtype": "int8"}


def _engine_config(values: Mapping[str, Any]) -> EngineConfig:
    values = {**WORKER_ENGINE_DEFAULTS, **values}

    def pick(**names: str) -> dict[str, Any]:
        return {field_: values[dest] for field_, dest in names.items() if dest in values}

    return EngineConfig(
        model=ModelConfig(
            **pick(
                source="model",
                dtype="dtype",
                max_model_len="max_model_len",
                quantization="quantization",
            )
        ),
        cache=CacheConfig(
            **pick(
                block_size="block_size",
                memory_gib="kv_cache_memory",
                num_blocks="num_kv_blocks",
                dtype="kv_cache_dtype",
                enable_prefix_caching="prefix_caching",
            )
        ),
        scheduler=SchedulerConfig(
            **pick(
                max_num_seqs="max_num_seqs",
                max_num_batched_tokens="max_num_batched_tokens",
                admission="admission",
                priority_aging_s="priority_aging",
            )
        ),
        **pick(seed="seed", num_threads="num_threads", enforce_eager="enforce_eager"),
    )
