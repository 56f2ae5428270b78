"""Redis key names (protocol v1): every stream, key and channel headrace touches is named here.

Producers and workers build names only through `Keys`, so a namespace change
(several deployments sharing one Redis) can never miss a key.
"""

from __future__ import annotations

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
    """Key names under one namespace (default "headrace")."""

    namespace: str = "headrace"

    def __post_init__(self) -> None:
        # A ':' or space would make names ambiguous or break `{ns}:*` scans.
        if not self.namespace or any(c in self.namespace for c in ": \t\r\n"):
            raise ValueError(
                f"namespace must be non-empty without ':' or spaces: {self.namespace!r}"
            )

    @property
    def requests(self) -> str:
        """Stream of jobs (field `job`), read by the worker consumer group; workers delete
        an entry once its final result is written and acked (the group must be the only one)."""
        return f"{self.namespace}:requests"

    def request_stream(self, priority: int) -> str:
        """The stream a job of `priority` goes to: `requests` for 0, `requests:high` above,
        `requests:low` below (the same contract as `requests`, one consumer group each)."""
        level = priority_level(priority)
        return self.requests if level == 0 else f"{self.requests}:{LEVEL_NAMES[level]}"

    @property
    def request_streams(self) -> tuple[str, ...]:
        """Every request stream, highest level first (the order workers read them in)."""
        return tuple(self.request_stream(level) for level in PRIORITY_LEVELS)

    @property
    def group(self) -> str:
        """Consumer group of the workers on each request stream (the same name on each)."""
        return CONSUMER_GROUP

    @property
    def dead_letter(self) -> str:
        """Stream of jobs that failed `max_attempts` deliveries or could not be answered (fields
        `job`: the payload's first bytes, `job_size`, `job_truncated`, `code`...)."""
        return f"{self.namespace}:dead"

    @property
    def cancel_channel(self) -> str:
        """Pub/sub channel: message = job id to cancel."""
        return f"{self.namespace}:cancel"

    @property
    def workers(self) -> str:
        """Hash consumer name → msgpack heartbeat/stats of live workers."""
        return f"{self.namespace}:workers"

    def result(self, job_id: str) -> str:
        """String: the final result msgpack (SET NX EX ttl) — also the exactly-once marker."""
        return f"{self.namespace}:result:{job_id}"

    def submitted(self, job_id: str) -> str:
        """String with TTL: the claim of a job id by its first submission (value informational),
        so that a second submission of the id queues nothing (ids are idempotency keys)."""
        return f"{self.namespace}:submitted:{job_id}"

    def cancelled(self, job_id: str) -> str:
        """String with TTL: set by `cancel`, so a job not started yet is cancelled on pickup."""
        return f"{self.namespace}:cancelled:{job_id}"

    def may_reply_to(self, name: str) -> bool:
        """Whether a job may name `name` as its reply_to: any key outside this namespace, and
        inside it only reply streams (never the queues, results, cancel markers or worker
        keys, which results written there would corrupt)."""
        own = name == self.namespace or name.startswith(f"{self.namespace}:")
        return not own or name.startswith(f"{self.namespace}:reply:")

    def reply(self, client_id: str) -> str:
        """Stream of results (field `result`) for one client; expires after the client closes
        (workers give it a TTL of `result_ttl` when their write created it, refreshed by each)."""
        return f"{self.namespace}:reply:{client_id}"

    def worker(self, consumer: str) -> str:
        """String with TTL: liveness marker of one worker consumer (refreshed by heartbeat)."""
        return f"{self.namespace}:worker:{consumer}"
