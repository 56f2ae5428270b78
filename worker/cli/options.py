"""Options stage: the one table of command-line options (and their `HEADRACE_*` variables).

Every verb picks its flags from `OPTIONS`: `headrace worker` all of them, `generate`
and `bench` the engine's (`ENGINE_OPTIONS`), `bulk` the engine's plus `--max-inflight`
for its local worker. A value comes from the flag, else from the option's environment
variable, else from the option's default (one per flag, below: the engine's own config
default where there is one). The only default that differs per verb is in
`WORKER_DEFAULTS`, with the reason beside it.

NOTE: ~330 lines: the table itself is the point, and it should read as one table.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
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
from worker.service.logs import LOG_FORMATS
from worker.service.settings import WorkerConfig

ENV_PREFIX = "HEADRACE_"


def parse_shard_list(text: str) -> tuple[int, ...]:
    """`0,2,5` → (0, 2, 5); empty → () (all shards)."""
    return tuple(int(part) for part in text.split(",") if part.strip())


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


@dataclass(frozen=True)
class Option:
    """One knob: flag `--dest-with-dashes` (plus `aliases`), env `HEADRACE_DEST`.

    default: the value when neither flag nor variable is given; None → the config's own
    (WorkerConfig's for the service knobs) or "unset" (e.g. max_model_len: the model's).
    """

    dest: str
    parse: Callable[[str], Any]
    help: str
    choices: tuple[str, ...] | None = None
    default: Any = None
    aliases: tuple[str, ...] = ()

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
        return self.parse is parse_bool

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


_S, _C, _M = SchedulerConfig, CacheConfig, ModelConfig

# NOTE: the order is `headrace worker --help`'s.
OPTIONS: tuple[Option, ...] = (
    Option("redis_url", str, "Redis URL; unset → start an embedded redis-server"),
    Option("namespace", str, "key prefix shared by producers and workers (default headrace)"),
    Option("consumer", str, "consumer name in the group (default hostname-pid-random)"),
    Option("model", str, "model directory, hub id, .gguf file or alias (default smollm2)", None, _M.source),
    Option("dtype", str, "weights and KV cache dtype", DTYPES, _M.dtype),
    Option("max_model_len", int, "context length (default: the model's)"),
    Option("quantization", str, "weight quantization applied at load", QUANTIZATIONS, _M.quantization),
    Option("kv_cache_memory", float, "KV cache size in GiB", None, _C.memory_gib),
    Option(
        "kv_cache_dtype",
        str,
        "KV cache storage: auto (model dtype) or int8 (int8 codes + a scale per token and kv "
        "head; the default of `headrace worker` and bulk's local worker)",
        KV_CACHE_DTYPES,
        _C.dtype,
    ),
    Option("num_kv_blocks", int, "KV cache size in blocks (overrides --kv-cache-memory)"),
    Option("block_size", int, "tokens per KV cache block", None, _C.block_size),
    Option(
        "prefix_caching",
        parse_bool,
        "reuse the KV pages of prompt prefixes computed before (default on)",
        None,
        _C.enable_prefix_caching,
    ),
    Option("max_num_seqs", int, "sequences per batch", None, _S.max_num_seqs),
    Option("max_num_batched_tokens", int, "tokens per forward pass", None, _S.max_num_batched_tokens),
    Option(
        "admission",
        str,
        "fcfs (default): admit while the next chunk fits; predicted: admit when prompt + "
        "predicted output fit beside the running sequences' predicted need (fewer preemptions)",
        ADMISSION_POLICIES,
        _S.admission,
    ),
    Option(
        "seed",
        int,
        "engine seed: requests without a `seed` param sample from a generator seeded by it",
        None,
        EngineConfig.seed,
    ),
    Option("num_threads", int, "torch CPU threads (default: all)", aliases=("--threads",)),
    Option(
        "enforce_eager",
        parse_bool,
        "run every step eagerly (default off: CUDA-graph decode steps on CUDA; never on CPU)",
        None,
        EngineConfig.enforce_eager,
    ),
    Option("max_inflight", int, "jobs held (read, not yet acked); default 2 × max-num-seqs"),
    Option(
        "priority_aging",
        float,
        "seconds of waiting that raise a job's priority by one, so none starves (default 60)",
        None,
        _S.priority_aging_s,
    ),
    Option("max_attempts", int, "deliveries before a job goes to the dead-letter stream"),
    Option("claim_idle_ms", int, "reclaim pending jobs of consumers silent this long"),
    Option("heartbeat_interval", float, "seconds between claim refreshes"),
    Option("read_block_ms", int, "XREADGROUP BLOCK time"),
    Option("redis_timeout", float, "seconds a Redis reply may take before reconnecting"),
    Option("result_ttl", int, "seconds a final result stays fetchable by id"),
    Option("max_payload_bytes", int, "largest accepted job payload"),
    Option("drain_timeout", float, "seconds to finish in-flight jobs on SIGTERM"),
    Option("burst", parse_bool, "process what is queued, then exit"),
    Option("tokenizer_threads", int, "threads that tokenize prompts"),
    Option("metrics_port", int, "Prometheus /metrics, /healthz, /readyz port (0 = off)"),
    Option(
        "metrics_host",
        str,
        "address the metrics server binds (default 127.0.0.1; 0.0.0.0 to be scraped from elsewhere)",
    ),
    Option("log_format", str, "text, or json for one JSON object a line", LOG_FORMATS),
    Option(
        "read_shards",
        parse_shard_list,
        "comma-separated request-stream shards this worker reads (default: all; see the "
        "URL's ?shards=N)",
    ),
)  # fmt: skip

# Option dest → EngineConfig place, for the engine's knobs (what `generate` and `bench` take).
_ENGINE_FIELDS: dict[str, tuple[str, str]] = {
    "model": ("model", "source"),
    "dtype": ("model", "dtype"),
    "max_model_len": ("model", "max_model_len"),
    "quantization": ("model", "quantization"),
    "block_size": ("cache", "block_size"),
    "kv_cache_memory": ("cache", "memory_gib"),
    "num_kv_blocks": ("cache", "num_blocks"),
    "kv_cache_dtype": ("cache", "dtype"),
    "prefix_caching": ("cache", "enable_prefix_caching"),
    "max_num_seqs": ("scheduler", "max_num_seqs"),
    "max_num_batched_tokens": ("scheduler", "max_num_batched_tokens"),
    "admission": ("scheduler", "admission"),
    "priority_aging": ("scheduler", "priority_aging_s"),
    "seed": ("", "seed"),
    "num_threads": ("", "num_threads"),
    "enforce_eager": ("", "enforce_eager"),
}
ENGINE_OPTIONS: tuple[Option, ...] = tuple(o for o in OPTIONS if o.dest in _ENGINE_FIELDS)

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
    "read_shards": "read_shards",
}

# Defaults of `headrace worker` (and so of bulk's local worker, a `headrace worker`) that
# differ from the table's: the int8 KV cache holds ~1.9x the tokens (more concurrent
# sequences) within the accuracy targets (README, `headrace eval`). `generate` and `bench`
# keep the model dtype (auto): in-process runs are where outputs are compared token for
# token with the unquantized model (and bench with transformers'), which int8 K/V would move.
WORKER_DEFAULTS: dict[str, Any] = {"kv_cache_dtype": "int8"}


def add_arguments(parser: Any, options: Iterable[Option] = OPTIONS) -> None:
    """Add each option as a flag defaulting to None (None = not given → env or default).

    parser: an ArgumentParser or an argument group; options: all of OPTIONS, or the subset a
    verb exposes.
    """
    for opt in options:
        names = (opt.flag, *opt.aliases)
        help_ = f"{opt.help} [env {opt.env}]"
        if opt.is_switch:
            parser.add_argument(
                *names,
                dest=opt.dest,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_,
            )
            continue
        parser.add_argument(
            *names, dest=opt.dest, type=opt.parse, default=None, choices=opt.choices, help=help_
        )


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The engine's flags, as an "engine" group (`generate`, `bench`)."""
    add_arguments(parser.add_argument_group("engine"), ENGINE_OPTIONS)


def resolve(
    options: Iterable[Option],
    flags: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Each option's value: its flag, else its variable, else `defaults`' or its own default
    (options whose value is None are left out).

    Raises:
        ValueError: a variable that does not parse, naming it.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for opt in options:
        if flags.get(opt.dest) is not None:
            values[opt.dest] = flags[opt.dest]
        elif env.get(opt.env):
            try:
                values[opt.dest] = opt.parse(env[opt.env])
            except ValueError as exc:
                raise ValueError(f"{opt.env}: {exc}") from None
            if opt.choices and values[opt.dest] not in opt.choices:
                raise ValueError(f"{opt.env} must be one of {opt.choices}")
        else:
            default = (defaults or {}).get(opt.dest, opt.default)
            if default is not None:
                values[opt.dest] = default
    return values


def apply_defaults(args: argparse.Namespace, options: Iterable[Option] = ENGINE_OPTIONS) -> None:
    """Set each of `options` left unset on `args` to its variable's or default value, for
    verbs that read the values back (bench reports them and passes them on)."""
    options = tuple(options)
    flags = {o.dest: getattr(args, o.dest, None) for o in options}
    for dest, value in resolve(options, flags).items():
        setattr(args, dest, value)


def engine_config(values: Mapping[str, Any]) -> EngineConfig:
    """The EngineConfig of resolved option values (dest → value; missing → the config's)."""
    parts: dict[str, dict[str, Any]] = {"model": {}, "cache": {}, "scheduler": {}, "": {}}
    for dest, (part, name) in _ENGINE_FIELDS.items():
        if dest in values:
            parts[part][name] = values[dest]
    return EngineConfig(
        model=ModelConfig(**parts["model"]),
        cache=CacheConfig(**parts["cache"]),
        scheduler=SchedulerConfig(**parts["scheduler"]),
        **parts[""],
    )


def engine_config_from_args(
    args: argparse.Namespace, env: Mapping[str, str] | None = None
) -> EngineConfig:
    """`generate`'s and `bench`'s engine: flags, else `HEADRACE_*` variables, else defaults."""
    flags = {o.dest: getattr(args, o.dest, None) for o in ENGINE_OPTIONS}
    return engine_config(resolve(ENGINE_OPTIONS, flags, env))


def worker_config(flags: Mapping[str, Any], env: Mapping[str, str] | None = None) -> WorkerConfig:
    """`headrace worker`'s config: flags override the environment, the environment overrides
    the defaults, so a compose file can set everything with variables and a person can still
    override one knob on the command line."""
    values = resolve(OPTIONS, flags, env, WORKER_DEFAULTS)
    worker = {f: values[d] for d, f in _WORKER_FIELDS.items() if d in values}
    return WorkerConfig(engine=engine_config(values), **worker)


def worker_config_from_args(
    args: argparse.Namespace, env: Mapping[str, str] | None = None
) -> WorkerConfig:
    """Flags given on the command line win over `HEADRACE_*` variables."""
    return worker_config({opt.dest: getattr(args, opt.dest, None) for opt in OPTIONS}, env)


def as_flags(values: Mapping[str, Any], options: Iterable[Option]) -> tuple[str, ...]:
    """`values` (dest → value; None = not given) as command-line flags of `options`."""
    flags: list[str] = []
    for opt in options:
        value = values.get(opt.dest)
        if value is None:
            continue
        if opt.is_switch:
            flags.append(opt.flag if value else opt.no_flag)
        elif isinstance(value, tuple):  # a list option (`--read-shards 0,2`)
            flags += [opt.flag, ",".join(str(v) for v in value)]
        else:
            flags += [opt.flag, str(value)]
    return tuple(flags)


def worker_config_from_env(env: Mapping[str, str] | None = None) -> WorkerConfig:
    """`headrace worker`'s config from `HEADRACE_*` variables alone (None → os.environ)."""
    return worker_config({}, env)
