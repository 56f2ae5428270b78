"""Submission (producer side of protocol v1): claim a job id and queue the job; find it again.

A job id is an idempotency key. The first submission of an id claims
`{ns}:submitted:{id}` and appends the job to the request stream of its priority level
in its id's shard (`Keys.job_stream`) in one script; a
later submission finds the claim (or the id's final result) and appends nothing, so
the id never runs twice and its caller gets the first submission's result.
`locate` tells where submitted jobs are, so that a producer can notice the ones
Redis lost (a restart without persistence, a failover, a FLUSHALL).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import ResponseError

from worker.keys import JOB_FIELD, Keys
from worker.layout import queue_script
from worker.protocol import Job, encode_job
from worker.redis_url import is_cluster

# Where a submitted job is (see `locate`).
DONE = "done"  # its final result is stored
QUEUED = "queued"  # its entry is in the request stream or pending in the group
LOST = "lost"  # neither: Redis lost it (or it is not submitted yet)
# Jobs located per transaction: each transaction holds Redis up for its length.
_LOCATE_CHUNK = 512

# KEYS: claim key, result key, request stream.
# ARGV: submission token (no spaces), claim TTL in s, job payload, '1' to resubmit, reply_to.
# The claim's value is "<token> <entry id> <reply_to>". Returns the job's entry id, or false
# when the id was claimed before or has a final result (nothing appended). The same token
# again (a client library re-sending a pipeline after a dropped connection) returns the entry
# of the first send instead of appending twice. A resubmission (of a job that Redis lost)
# claims and appends regardless of an earlier claim or result.
_SUBMIT_LUA = f"""
local claim = redis.call('GET', KEYS[1])
if claim then
  local token, entry = string.match(claim, '^(%S+) (%S+)')
  if token == ARGV[1] then return entry end
  if ARGV[4] ~= '1' then return false end
elseif ARGV[4] ~= '1' and redis.call('EXISTS', KEYS[2]) == 1 then
  return false
end
local entry = redis.call('XADD', KEYS[3], '*', '{JOB_FIELD}', ARGV[3])
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. entry .. ' ' .. ARGV[5], 'EX', ARGV[2])
return entry
"""


@dataclass(frozen=True)
class Submission:
    """One submitted job. entry_id: its entry in `stream` (the request stream of its
    priority level); both None when `reused`.

    reused: the id had been submitted before (it is an idempotency key): nothing was
        queued, and the job's result is that earlier submission's.
    """

    id: str
    entry_id: str | None
    reused: bool = False
    stream: str | None = None


class Submitter:
    """Claims and queues jobs under one namespace (one script, pipelined)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, *, claim_ttl_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self._claim_ttl_s = claim_ttl_s
        self._script: AsyncScript = redis.register_script(_SUBMIT_LUA)

    async def send(
        self, jobs: Sequence[Job], *, resubmit: bool = False, tokens: Sequence[str] = ()
    ) -> list[Submission]:
        """Claim and queue each job in one round trip; `resubmit` queues even a claimed id.

        tokens: one per job (default: fresh ones); sending the same jobs with the same
            tokens again queues nothing new and returns the same entries.
        """
        keys = self._keys
        tokens = tokens or [uuid.uuid4().hex for _ in jobs]
        async with self._redis.pipeline(transaction=False) as pipe:
            for job, token in zip(jobs, tokens, strict=True):
                # Loaded by the pipeline if Redis lacks it (what Script.__call__ does).
                queue_script(
                    pipe,
                    self._script,
                    (
                        keys.submitted(job.id),
                        keys.result(job.id),
                        keys.job_stream(job.id, job.priority),
                    ),
                    (token, self._claim_ttl_s, encode_job(job), int(resubmit), job.reply_to),
                )
            entry_ids = await pipe.execute()
        return [
            Submission(job.id, None, reused=True)
            if entry_id is None
            else Submission(job.id, _text(entry_id), stream=keys.job_stream(job.id, job.priority))
            for job, entry_id in zip(jobs, entry_ids, strict=True)
        ]

    async def locate(self, submissions: Sequence[Submission]) -> dict[str, str]:
        """DONE, QUEUED or LOST per job id, read in one transaction (a consistent view).

        A job is LOST when it has no final result, no entry in the request stream and
        no pending entry in the workers' group. Reused submissions are not located.
        """
        by_shard: dict[int, list[Submission]] = {}
        for sub in submissions:
            if sub.entry_id is not None:
                by_shard.setdefault(self._keys.shard_of(sub.id), []).append(sub)
        places: dict[str, str] = {}
        # One transaction per shard (one cluster slot: a transaction cannot span two).
        for queued in by_shard.values():
            for start in range(0, len(queued), _LOCATE_CHUNK):
                places.update(await self._locate(queued[start : start + _LOCATE_CHUNK]))
        return places

    async def _locate(self, queued: Sequence[Submission]) -> dict[str, str]:
        keys = self._keys
        async with self._redis.pipeline(transaction=True) as pipe:
            for sub in queued:
                stream = sub.stream or keys.job_stream(sub.id, 0)
                pipe.exists(keys.result(sub.id))
                pipe.xrange(stream, sub.entry_id, sub.entry_id, count=1)
                pipe.xpending_range(stream, keys.group, sub.entry_id, sub.entry_id, 1)
            replies = await pipe.execute(raise_on_error=False)
        places = {}
        for i, sub in enumerate(queued):
            stored, entry, pending = replies[3 * i : 3 * i + 3]
            if isinstance(pending, ResponseError) and "NOGROUP" in str(pending):
                pending = []  # the group is gone with the data: nothing pending
            for reply in (stored, entry, pending):
                if isinstance(reply, Exception):
                    raise reply
            places[sub.id] = DONE if stored else QUEUED if entry or pending else LOST
        return places

    async def server_run_id(self) -> str:
        """The Redis server's run_id: it changes when the server restarts or fails over (on a
        cluster: the primaries' node ids, which change on a failover)."""
        if is_cluster(self._redis):
            # The live primaries' node ids (any node answers): a failover changes them. A
            # primary restarted empty keeps its id; `locate` finds what it lost.
            nodes = await self._redis.execute_command("CLUSTER NODES")
            return ",".join(
                sorted(
                    str(node["node_id"])
                    for node in nodes.values()
                    if "master" in node["flags"] and "fail" not in node["flags"]
                )
            )
        info = await self._redis.info("server")
        return str(info["run_id"])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
