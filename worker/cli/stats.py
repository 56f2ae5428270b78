"""The `headrace stats` verb (operations, read-only): queue depth, pending per consumer, dead letters, throughput.

Reads only what Redis already holds: XINFO on the request streams (one per priority
level; the top lines are the default one's, the others get a line each) and their groups,
XLEN of the dead-letter stream, and the per-worker stats hash that each worker
refreshes every heartbeat (recent tok/s and req/s, engine occupancy, prefix cache
hit ratio) together
with its liveness key, so stats of a crashed worker are shown but not summed.

NOTE: ~310 lines: the reads and the report they feed are one verb.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import msgpack
import redis

from worker.keys import Keys
from worker.redis_url import connect, keys_for, redact_url

REDIS_URL_ENV = "HEADRACE_REDIS_URL"
NAMESPACE_ENV = "HEADRACE_NAMESPACE"
DEFAULT_REDIS_URL = "redis://localhost:6379/0"  # what the compose stack publishes


@dataclass(frozen=True)
class ConsumerStats:
    """One consumer of the requests group and, if it is a live worker, its own report.

    idle_s: since its last read or claim (XINFO CONSUMERS); None if it never read.
    worker: the stats hash entry (running, waiting, recent_tok_s...); None if it has none.
    """

    name: str
    pending: int
    idle_s: float | None
    alive: bool
    worker: dict[str, Any] | None


@dataclass(frozen=True)
class LevelStats:
    """The request stream of a priority level other than the default (as in QueueStats)."""

    stream: str
    length: int
    lag: int | None
    pending: int
    oldest_waiting_s: float | None
    grouped: bool = True  # the workers' group exists on it


@dataclass(frozen=True)
class QueueStats:
    """What `headrace stats` reports for one namespace.

    stream, length, lag, pending, oldest_*: of the default priority level's stream;
    levels: the same for the other levels' streams that exist (consumers count all levels).
    shards: request-stream shards; with several, the default-level figures are their sums
        (oldest: the oldest of any shard), and `levels` has each shard's other levels.
    lag: entries not yet delivered to any worker (None before the group exists).
    oldest_waiting_s / oldest_pending_s: age of the oldest undelivered / unacked entry.
    prefix_cache_hit_ratio: prompt tokens served from the live workers' prefix caches / their
        prompt tokens, since each started; None before any worker reported one.
    """

    namespace: str
    stream: str
    length: int
    lag: int | None
    pending: int
    oldest_waiting_s: float | None
    oldest_pending_s: float | None
    dead_letter: int
    consumers: tuple[ConsumerStats, ...]
    live_workers: int
    recent_tok_s: float
    recent_req_s: float
    prefix_cache_hit_ratio: float | None = None
    levels: tuple[LevelStats, ...] = ()
    shards: int = 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "stats",
        help="queue length, pending jobs per consumer, dead letters, recent throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL,
        help=f"the workers' Redis (default ${REDIS_URL_ENV}, else {DEFAULT_REDIS_URL})",
    )
    parser.add_argument(
        "--namespace",
        default=os.environ.get(NAMESPACE_ENV) or "headrace",
        help=f"key namespace (default ${NAMESPACE_ENV}, else headrace)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        keys = keys_for(args.redis_url, args.namespace)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    client = connect(args.redis_url)
    try:
        stats = collect(client, keys)
    except redis.exceptions.RedisError as exc:
        print(f"error: cannot read stats from {redact_url(args.redis_url)}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(json.dumps(asdict(stats)) if args.json else render(stats, args.redis_url))
    return 0


def collect(client: Any, keys: Keys, now_ms: float | None = None) -> QueueStats:
    """Gather the stats of `keys.namespace` (a handful of round trips per shard, whatever the
    queue size). With several shards the top lines sum the shards' default-level streams."""
    now_ms = time.time() * 1000 if now_ms is None else now_ms
    defaults = [keys.request_stream(0, shard) for shard in keys.all_shards]
    tops = [_level(client, keys, stream, now_ms, maybe_missing=True) for stream in defaults]
    levels = tuple(
        level
        for stream in keys.request_streams
        if stream not in defaults and client.exists(stream)
        for level in [_level(client, keys, stream, now_ms)]
    )
    rows: list[dict[str, Any]] = []
    for level in (*tops, *levels):
        if level.grouped:
            rows += client.xinfo_consumers(level.stream, keys.group)
    reports = {_text(k): msgpack.unpackb(v) for k, v in client.hgetall(keys.workers).items()}
    names = sorted({_text(r["name"]) for r in rows} | set(reports))
    pending_of = dict.fromkeys(names, 0)
    for r in rows:
        pending_of[_text(r["name"])] += int(r["pending"])
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.exists(keys.worker(name))
    alive = dict(zip(names, (bool(x) for x in pipe.execute()), strict=True))
    idle_ms: dict[str, int] = {}  # the most recent activity on any level's stream
    for r in rows:
        name = _text(r["name"])
        idle_ms[name] = min(int(r["idle"]), idle_ms.get(name, int(r["idle"])))
    consumers = tuple(
        ConsumerStats(
            name=name,
            pending=pending_of[name],
            idle_s=idle_ms[name] / 1000 if name in idle_ms else None,
            alive=alive[name],
            worker=reports.get(name),
        )
        for name in names
    )
    live = [c.worker for c in consumers if c.alive and c.worker is not None]
    pending = sum(top.pending for top in tops)
    lags = [top.lag for top in tops]
    return QueueStats(
        namespace=keys.namespace,
        stream=keys.requests if keys.shards == 1 else f"{keys.shards} shards' {defaults[0]}...",
        length=sum(top.length for top in tops),
        lag=None if None in lags else sum(lag for lag in lags if lag is not None),
        pending=pending,
        oldest_waiting_s=_oldest([top.oldest_waiting_s for top in tops]),
        oldest_pending_s=_oldest(
            [
                _oldest_pending(client, keys, stream, now_ms)
                for stream, t in zip(defaults, tops, strict=True)
                if t.pending
            ]
        ),
        dead_letter=sum(int(client.xlen(name)) for name in keys.dead_letters),
        consumers=consumers,
        live_workers=len(live),
        recent_tok_s=round(sum(float(w.get("recent_tok_s", 0)) for w in live), 2),
        recent_req_s=round(sum(float(w.get("recent_req_s", 0)) for w in live), 3),
        prefix_cache_hit_ratio=_hit_ratio(live),
        levels=levels,
        shards=keys.shards,
    )


def _oldest(ages: list[float | None]) -> float | None:
    known = [age for age in ages if age is not None]
    return max(known) if known else None


def _level(
    client: Any, keys: Keys, stream: str, now_ms: float, *, maybe_missing: bool = False
) -> LevelStats:
    """maybe_missing: the stream may not exist yet (the default levels): no group then."""
    length = int(client.xlen(stream))
    group = (
        _group(client, keys, stream)
        if not maybe_missing or length or client.exists(stream)
        else None
    )
    pending = int(group["pending"]) if group else 0
    return LevelStats(
        stream=stream,
        length=length,
        lag=_lag(group, length, pending),
        pending=pending,
        oldest_waiting_s=_oldest_waiting(client, stream, group, now_ms),
        grouped=group is not None,
    )


def _hit_ratio(workers: list[dict[str, Any]]) -> float | None:
    """Hit tokens / query tokens summed over `workers` (weighted by their prompt tokens)."""
    queries = sum(int(w.get("prefix_cache_queries", 0)) for w in workers)
    hits = sum(int(w.get("prefix_cache_hits", 0)) for w in workers)
    return round(hits / queries, 4) if queries else None


def _group(client: redis.Redis, keys: Keys, stream: str) -> dict[str, Any] | None:
    for row in client.xinfo_groups(stream):
        if _text(row["name"]) == keys.group:
            return row
    return None


def _lag(group: dict[str, Any] | None, length: int, pending: int) -> int | None:
    """Undelivered entries: all of them before any worker made the group.

    Redis 7 cannot tell the lag right after the last delivered entry was deleted (XDEL) while
    older entries remain; workers delete every entry they ack, so the stream holds only
    pending and undelivered entries and `length - pending` is the lag. None before Redis 7.
    """
    if group is None:
        return length
    if group.get("lag") is not None:
        return int(group["lag"])
    return max(0, length - pending) if "entries-read" in group else None


def _oldest_waiting(
    client: redis.Redis, stream: str, group: dict[str, Any] | None, now_ms: float
) -> float | None:
    # The first entry after the group's last delivered id is the oldest one nobody took yet.
    start = "-" if group is None else "(" + _text(group["last-delivered-id"])
    first = client.xrange(stream, min=start, count=1)
    return _age_s(first[0][0], now_ms) if first else None


def _oldest_pending(client: Any, keys: Keys, stream: str, now_ms: float) -> float | None:
    summary = client.xpending(stream, keys.group)
    return _age_s(summary["min"], now_ms) if summary.get("min") else None


def _age_s(entry_id: bytes | str, now_ms: float) -> float:
    return round(max(0.0, now_ms - int(_text(entry_id).split("-", 1)[0])) / 1000, 1)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def render(stats: QueueStats, redis_url: str) -> str:
    """The human-readable report: a summary block, then one row per consumer."""
    lag = "?" if stats.lag is None else str(stats.lag)
    lines = [
        f"headrace stats: namespace {stats.namespace} on {redact_url(redis_url)}",
        f"  requests    {stats.stream}: {stats.length} entries, {lag} waiting, "
        f"{stats.pending} pending (delivered, not acked yet)",
        *(
            f"  priority    {level.stream}: {level.length} entries, "
            f"{'?' if level.lag is None else level.lag} waiting, {level.pending} pending, "
            f"oldest waiting {_age(level.oldest_waiting_s)}"
            for level in stats.levels
        ),
        f"  oldest      waiting {_age(stats.oldest_waiting_s)}, pending {_age(stats.oldest_pending_s)}",
        f"  dead-letter {_dead_letter_name(stats)}: {stats.dead_letter} entries",
        f"  throughput  {stats.recent_tok_s:.1f} tok/s, {stats.recent_req_s:.2f} req/s "
        f"(last minute, live workers: {stats.live_workers})",
        f"  prefix cache {_percent(stats.prefix_cache_hit_ratio)} of prompt tokens served from "
        "cache (live workers, since start)",
    ]
    if not stats.consumers:
        return "\n".join([*lines, "  no consumers yet"])
    header = (
        "consumer", "alive", "pending", "idle", "running", "waiting", "kv", "cache hit", "tok/s",
        "req/s",
    )  # fmt: skip
    table = [header] + [_row(c) for c in stats.consumers]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines.append("")
    for row in table:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  " + "  ".join(cells))
    return "\n".join(lines)


def _row(c: ConsumerStats) -> tuple[str, ...]:
    w = c.worker or {}
    kv = "-"
    if w.get("kv_total_blocks"):
        kv = f"{100 * w['kv_used_blocks'] / w['kv_total_blocks']:.0f}%"
    return (
        c.name,
        "yes" if c.alive else "no",
        str(c.pending),
        _age(c.idle_s),
        str(w.get("running", "-")),
        str(w.get("waiting", "-")),
        kv,
        _percent(w.get("prefix_cache_hit_ratio")),
        f"{w['recent_tok_s']:.1f}" if "recent_tok_s" in w else "-",
        f"{w['recent_req_s']:.2f}" if "recent_req_s" in w else "-",
    )


def _dead_letter_name(stats: QueueStats) -> str:
    keys = Keys(stats.namespace, shards=stats.shards)
    return (
        keys.dead_letter if stats.shards == 1 else f"{stats.shards} shards' {keys.dead_letter}..."
    )


def _percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{100 * ratio:.0f}%"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}m" if seconds < 7200 else f"{seconds / 3600:.1f}h"
