"""Redis key names (protocol v1): every stream, key and channel headrace touches is named here.

Producers and workers build names only through `Keys`, so a namespace change
(several deployments sharing one Redis) can never miss a key.

Shards (docs/protocol.md, "Shards"): with `shards` > 1, or `tagged` (Redis Cluster), the
per-job keys live in shards. Shard i's keys start with the hash tag `{ns:i}` (one
cluster slot), so every key one job's scripts touch (its request streams, result,
submission claim, cancel marker, dead-letter stream, the reply streams read for that
shard) is in one slot. A job goes to shard `crc32(utf8(id)) % shards`. One untagged
shard (the default) keeps the original names: `{ns}:requests`, `{ns}:result:{id}`...
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

# Stream entry field names: one msgpack map per entry.
JOB_FIELD = "job"
RESULT_FIELD = "result"
CONSUMER_GROUP = "headrace"

# (request stream, entry id): an entry id is unique only within its stream.
EntryRef = tuple[str, str]

# Priority levels (protocol): a job's `priority` picks the request stream of its level,
# and workers read the streams from the highest level down. Level 0 (priority 0, the
# default) is the original `{ns}:requests`, so producers and workers that predate the
# levels keep working unchanged for priority-0 jobs.
PRIORITY_LEVELS = (1, 0, -1)
LEVEL_NAMES = {1: "high", 0: "default", -1: "low"}


def priority_level(priority: int) -> int:
    """The stream level of a job priority: 1 above zero, -1 below, else 0."""
    return 1 if priority > 0 else -1 if priority < 0 else 0


@dataclass(frozen=True)
class Keys:
    """Key names under one namespace (default "headrace").

    shards: request-stream shards (1: one, under the original names unless `tagged`).
    tagged: shard keys carry the hash tag `{ns:i}` (forced on by shards > 1; a Redis Cluster
        needs it even with one shard, so that a job's keys share a slot).
    reading: the shards whose request streams this process reads (a worker given a subset);
        empty: all of them.
    """

    namespace: str = "headrace"
    shards: int = 1
    tagged: bool = False
    reading: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # A ':' or space would make names ambiguous or break `{ns}:*` scans; braces would
        # change the hash tag.
        if not self.namespace or any(c in self.namespace for c in ": \t\r\n{}"):
            raise ValueError(
                f"namespace must be non-empty without ':', braces or spaces: {self.namespace!r}"
            )
        if self.shards < 1:
            raise ValueError(f"shards must be >= 1, got {self.shards}")
        if self.shards > 1 and not self.tagged:
            object.__setattr__(self, "tagged", True)
        if any(not 0 <= shard < self.shards for shard in self.reading):
            raise ValueError(f"shards to read must be in [0, {self.shards}): {self.reading}")

    # -- shards -----------------------------------------------------------------------

    def prefix(self, shard: int = 0) -> str:
        """What shard `shard`'s key names start with: `{ns:i}` when tagged, else `ns`."""
        return f"{{{self.namespace}:{shard}}}" if self.tagged else self.namespace

    def shard_of(self, job_id: str) -> int:
        """The shard of a job id: crc32 (IEEE, zlib's) of its UTF-8 bytes mod shards."""
        if self.shards == 1:
            return 0
        return zlib.crc32(job_id.encode("utf-8", "surrogatepass")) % self.shards

    def shard_of_key(self, name: str) -> int | None:
        """The shard whose hash tag `name` carries (0 for every name when untagged);
        None: not a shard key of this namespace."""
        if not self.tagged:
            return 0
        opener = f"{{{self.namespace}:"
        end = name.find("}")
        if not name.startswith(opener) or end < 0:
            return None
        digits = name[len(opener) : end]
        if not digits.isdigit() or int(digits) >= self.shards or str(int(digits)) != digits:
            return None
        return int(digits)

    def no_key(self, shard: int = 0) -> str:
        """A script's "no such key" in `shard`: '' untagged, `{ns:i}:-` tagged (a cluster
        routes a script by its keys, so even a placeholder must hash to the shard's slot)."""
        return f"{self.prefix(shard)}:-" if self.tagged else ""

    @property
    def all_shards(self) -> range:
        return range(self.shards)

    @property
    def read_shards(self) -> tuple[int, ...]:
        """The shards whose request streams are read here (`reading`, else all)."""
        return tuple(sorted(set(self.reading))) or tuple(self.all_shards)

    @property
    def layout(self) -> str:
        """String key: the shard count producers and workers of this namespace agree on
        (written by the first, checked by every later one; see `layout_value`)."""
        return f"{self.namespace}:shards"

    @property
    def layout_value(self) -> str:
        """What `layout` holds for this key layout: the shard count, `t` added when tagged."""
        return f"{self.shards}t" if self.tagged else str(self.shards)

    # -- request streams -----------------------------------------------------------------

    @property
    def requests(self) -> str:
        """Stream of jobs (field `job`) of shard 0, read by the worker consumer group; workers
        delete an entry once its final result is written and acked (the group must be the
        only one)."""
        return self.request_stream(0)

    def request_stream(self, priority: int, shard: int = 0) -> str:
        """The stream a job of `priority` goes to in `shard`: `requests` for 0,
        `requests:high` above, `requests:low` below (the same contract as `requests`, one
        consumer group each)."""
        base = f"{self.prefix(shard)}:requests"
        level = priority_level(priority)
        return base if level == 0 else f"{base}:{LEVEL_NAMES[level]}"

    def job_stream(self, job_id: str, priority: int) -> str:
        """The request stream a job goes to: its priority's, in its id's shard."""
        return self.request_stream(priority, self.shard_of(job_id))

    def shard_streams(self, shard: int) -> tuple[str, ...]:
        """The request streams of one shard, highest level first."""
        return tuple(self.request_stream(level, shard) for level in PRIORITY_LEVELS)

    @property
    def request_streams(self) -> tuple[str, ...]:
        """The request streams read here (`read_shards`): shard by shard, highest level first."""
        return tuple(name for shard in self.read_shards for name in self.shard_streams(shard))

    @property
    def stream_levels(self) -> tuple[tuple[str, int, int], ...]:
        """(stream, level, shard) of each of `request_streams`, in its order."""
        return tuple(
            (self.request_stream(level, shard), level, shard)
            for shard in self.read_shards
            for level in PRIORITY_LEVELS
        )

    @property
    def group(self) -> str:
        """Consumer group of the workers on each request stream (the same name on each)."""
        return CONSUMER_GROUP

    # -- per-job keys (in the job's shard) -------------------------------------------------

    @property
    def dead_letter(self) -> str:
        """Stream of jobs that failed `max_attempts` deliveries or could not be answered (fields
        `job`: the payload's first bytes, `job_size`, `job_truncated`, `code`...), shard 0."""
        return self.dead_letter_of(0)

    def dead_letter_of(self, shard: int) -> str:
        """The dead-letter stream of one shard (a job is dead-lettered in its own)."""
        return f"{self.prefix(shard)}:dead"

    @property
    def dead_letters(self) -> tuple[str, ...]:
        return tuple(self.dead_letter_of(shard) for shard in self.all_shards)

    def result(self, job_id: str, shard: int | None = None) -> str:
        """String: the final result msgpack (SET NX EX ttl) — also the exactly-once marker.
        shard: None → the id's own (a worker answering a misrouted entry passes its shard)."""
        return f"{self._job_prefix(job_id, shard)}:result:{job_id}"

    def submitted(self, job_id: str) -> str:
        """String with TTL: the claim of a job id by its first submission (value informational),
        so that a second submission of the id queues nothing (ids are idempotency keys)."""
        return f"{self._job_prefix(job_id)}:submitted:{job_id}"

    def cancelled(self, job_id: str) -> str:
        """String with TTL: set by `cancel`, so a job not started yet is cancelled on pickup."""
        return f"{self._job_prefix(job_id)}:cancelled:{job_id}"

    def _job_prefix(self, job_id: str, shard: int | None = None) -> str:
        return self.prefix(self.shard_of(job_id) if shard is None else shard)

    # -- replies ------------------------------------------------------------------------------

    def reply(self, client_id: str, shard: int = 0) -> str:
        """Stream of results (field `result`) for one client's jobs of one shard; expires after
        the client closes (workers give it a TTL of `result_ttl` when their write created it,
        refreshed by each)."""
        return f"{self.prefix(shard)}:reply:{client_id}"

    def replies(self, client_id: str) -> tuple[str, ...]:
        """A client's reply streams, one per shard (the client reads each)."""
        return tuple(self.reply(client_id, shard) for shard in self.all_shards)

    def may_reply_to(self, name: str, job_id: str | None = None) -> bool:
        """Whether a job may name `name` as its reply_to: any key outside this namespace, and
        inside it only reply streams (never the queues, results, cancel markers or worker
        keys, which results written there would corrupt). Tagged: only a reply stream of
        the job's own shard (`job_id`'s; None: any shard), the one slot its script may touch."""
        if self.tagged:
            shard = self.shard_of_key(name)
            own = job_id is None or shard == self.shard_of(job_id)
            if shard is None or not own or name.endswith("}:-"):  # that is `no_key`'s form
                return False
            return name.startswith(f"{self.prefix(shard)}:reply:")
        own = name == self.namespace or name.startswith(f"{self.namespace}:")
        return not own or name.startswith(f"{self.namespace}:reply:")

    # -- namespace-wide keys (any node) ---------------------------------------------------------

    @property
    def cancel_channel(self) -> str:
        """Pub/sub channel: message = job id to cancel."""
        return f"{self.namespace}:cancel"

    @property
    def workers(self) -> str:
        """Hash consumer name → msgpack heartbeat/stats of live workers."""
        return f"{self.namespace}:workers"

    def worker(self, consumer: str) -> str:
        """String with TTL: liveness marker of one worker consumer (refreshed by heartbeat)."""
        return f"{self.namespace}:worker:{consumer}"
