"""Publish stage: incremental detokenization, stop strings, deltas, final results + XACK to Redis.

Each engine step's outputs become queued Redis operations; one flusher task
writes everything queued so far in a single pipeline, shielded from
cancellation so a shutdown never leaves a half-written batch. A final result is
published by one Lua script (SET NX result key, XADD reply_to, XACK, XDEL), so a
job run twice after a crash still yields exactly one final result, the entry is
acked only once its result is written, and deleted from the requests stream only
once acked. Reply streams get a TTL (see `_XADD_REPLY_LUA`).

NOTE: ~350 lines, most of them the Lua scripts with their KEYS/ARGV contracts beside
them: what publishes a final result exactly once reads best next to what queues it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from worker.engine import TokenOutput, logprobs_to_dicts
from worker.errors import RequestError
from worker.keys import EntryRef, Keys
from worker.layout import queue_script
from worker.protocol import (
    STATUS_CANCELLED,
    STATUS_OK,
    STATUS_PARTIAL,
    Result,
    encode_result,
    error_result,
)
from worker.service.jobs import JobState, entry_time_ms, now_ms
from worker.service.metrics import Metrics
from worker.service.resilience import TRANSIENT, Retrier

log = logging.getLogger(__name__)

# XADD a result to a reply stream and bound the stream's life: a stream this write created,
# or one whose TTL is shorter, gets `ttl` seconds (so a stream nobody reads any more expires
# `ttl` after its last result); a stream without TTL was made persistent by its owner and
# stays so. Never shortens a TTL, so a live client's stream never expires sooner than its
# own refresh says. pcall: returns XADD's error (a key that is not a stream) as a value.
_XADD_REPLY_LUA = """
local function xadd_reply(stream, ttl, maxlen, payload)
  local before = redis.call('TTL', stream)
  local added = redis.pcall('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'result', payload)
  if type(added) == 'string' and (before == -2 or (before >= 0 and before < ttl)) then
    redis.call('EXPIRE', stream, ttl)
  end
  return added
end
"""

# KEYS: reply stream. ARGV: ttl s, reply maxlen, payload. A delta (partial result).
_PARTIAL_LUA = _XADD_REPLY_LUA + "return xadd_reply(KEYS[1], tonumber(ARGV[1]), ARGV[2], ARGV[3])\n"

# KEYS: requests stream. ARGV: group, entry id. Ack an entry whose final result exists, then
# delete it: an acked entry is never read again (XACK raises first if it cannot run).
_ACK_DELETE_LUA = """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return redis.call('XDEL', KEYS[1], ARGV[2])
"""

# KEYS: result key, reply stream ('' = nobody to answer), the entry's request stream,
# dead-letter stream ('' = none). On a cluster every key must hash to the entry's slot, so
# "none" is written `{ns:i}:-` there (`Keys.no_key`: a name no stream of ours ends like).
# ARGV: payload, ttl s (result key and reply stream), reply maxlen, group, entry id,
# dead-letter maxlen, n, then n (request stream, entry id) pairs: other entries of this job
# to delete (duplicates acked earlier, possibly in another priority level's stream), then
# the dead-letter entry's field/value pairs.
# Returns 1 if this call published the final result, 0 if one already existed.
# The dead-letter entry is written only with the first final result, so an entry reclaimed
# again while its refusal was being written is not dead-lettered twice.
# The entry is deleted from the requests stream only after its XACK, in the same atomic
# script: an entry still pending or not yet delivered is never deleted, and nobody ever
# sees it deleted while pending (which reclaim would report as `entry_deleted`).
_PUBLISH_FINAL_LUA = (
    _XADD_REPLY_LUA
    + """
local function given(key) return key ~= '' and string.sub(key, -3) ~= '}:-' end
local first = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])
if first and given(KEYS[2]) then
  -- an error (reply_to is not a stream) must not keep the entry pending forever
  xadd_reply(KEYS[2], tonumber(ARGV[2]), ARGV[3], ARGV[1])
end
local extra = tonumber(ARGV[7])
if first and given(KEYS[4]) then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', unpack(ARGV, 8 + 2 * extra))
end
redis.call('XACK', KEYS[3], ARGV[4], ARGV[5])
redis.call('XDEL', KEYS[3], ARGV[5])
for i = 8, 7 + 2 * extra, 2 do
  redis.call('XDEL', ARGV[i], ARGV[i + 1])
end
if first then return 1 end
return 0
"""
)

DEAD_LETTER_MAXLEN = 100_000
_REFUSED_RETRY_S = 0.2


class Publisher:
    """Turns engine outputs into results and writes them to Redis in pipelined batches.

    on_acked: called (on the event loop) with each JobState whose final result
    and XACK have been written, so the service can release its in-flight slot.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        *,
        worker: str,
        result_ttl_s: int,
        reply_maxlen: int,
        on_acked: Callable[[JobState], None],
        metrics: Metrics | None = None,
    ) -> None:
        self._redis = client
        self._keys = keys
        self._worker = worker
        self._ttl = result_ttl_s
        self._maxlen = reply_maxlen
        self._on_acked = on_acked
        self._metrics = metrics if metrics is not None else Metrics()
        self._script = client.register_script(_PUBLISH_FINAL_LUA)
        self._retry = Retrier()
        self._ops: list[_Op] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.num_published = 0
        self.num_duplicates = 0

    # -- engine outputs → results -----------------------------------------------

    def on_output(self, state: JobState, out: TokenOutput) -> bool:
        """Apply one TokenOutput; True when a stop string matched (caller aborts the request)."""
        output = state.output
        if state.done or output is None:
            return False
        if out.new_token_ids and (first_ms := state.note_first_token()) is not None:
            waited_ms = first_ms - entry_time_ms(state.entry_id)
            self._metrics.observe_priority_wait(state.job.priority, max(0.0, waited_ms) / 1000)
        delta = output.add(out)
        self._metrics.add_generation_tokens(len(out.new_token_ids))
        text = delta.text
        if out.finished and not delta.stopped:
            text += output.flush()
        if state.job.stream and (text or out.new_token_ids):
            self.partial(state, text, out.new_token_ids)
        if delta.stopped:
            self.final(state, STATUS_OK, "stop")
            return True
        if out.finished:
            status = STATUS_CANCELLED if out.finish_reason == "abort" else STATUS_OK
            self.final(state, status, out.finish_reason)
        return False

    def partial(self, state: JobState, delta: str, token_ids: tuple[int, ...]) -> None:
        result = Result(
            id=state.job.id,
            status=STATUS_PARTIAL,
            delta=delta,
            token_ids=tuple(token_ids),
            worker=self._worker,
            attempt=state.attempt,
        )
        payload = encode_result(result)
        reply_to = state.job.reply_to
        # EVAL, not EVALSHA: a batch of deltas alone needs no SCRIPT EXISTS round trip.
        self._queue(
            lambda pipe: pipe.eval(_PARTIAL_LUA, 1, reply_to, self._ttl, self._maxlen, payload)
        )

    def final(self, state: JobState, status: str, finish_reason: str | None) -> None:
        """Queue the final ok/cancelled result of a job that ran (or started running)."""
        output = state.output
        token_ids = output.token_ids if output is not None else []
        logprobs = output.logprobs if output is not None else []
        usage = {
            "prompt_tokens": len(state.request.prompt_token_ids) if state.request else 0,
            "completion_tokens": len(token_ids),
        }
        result = Result(
            id=state.job.id,
            status=status,
            text=output.text if output is not None else "",
            token_ids=tuple(token_ids),
            finish_reason=finish_reason,
            usage=usage,
            timings=self._timings(state),
            worker=self._worker,
            attempt=state.attempt,
            logprobs=logprobs_to_dicts(logprobs) if logprobs else None,
        )
        self._finish(state, result)

    def fail(self, state: JobState, error: RequestError) -> None:
        """Queue the final error result of a job (invalid, expired, engine failure...)."""
        result = error_result(
            state.job.id,
            error,
            timings=self._timings(state),
            worker=self._worker,
            attempt=state.attempt,
        )
        self._finish(state, result)

    def refuse(
        self,
        entry: EntryRef,
        job_id: str,
        reply_to: str | None,
        error: RequestError,
        attempt: int,
        dead_letter: dict[str, Any] | None,
        on_done: Callable[[bool], None] | None = None,
    ) -> None:
        """Answer (if reply_to is known) and ack an entry that will not run.

        dead_letter: fields of a dead-letter entry to write first (max attempts,
        or nobody to answer), so the job is kept for operators.
        on_done(first): called once written; first is False when an earlier refusal
        of the same job (this entry reclaimed while it was being written) got there first.
        """
        result = error_result(job_id, error, worker=self._worker, attempt=attempt)
        self._metrics.observe_result(result)
        self._queue_final(entry, job_id, reply_to, encode_result(result), on_done, dead_letter)

    def _finish(self, state: JobState, result: Result) -> None:
        state.mark_done()
        self._metrics.observe_result(result)
        self._queue_final(
            state.ref,
            state.job.id,
            state.job.reply_to,
            encode_result(result),
            lambda _first: self._on_acked(state),
            duplicates=state.duplicates,
        )

    def _queue_final(
        self,
        entry: EntryRef,
        job_id: str,
        reply_to: str | None,
        payload: bytes,
        on_done: Callable[[bool], None] | None,
        dead_letter: dict[str, Any] | None = None,
        duplicates: list[EntryRef] | tuple[EntryRef, ...] = (),
    ) -> None:
        stream, entry_id = entry
        # NOTE: every key in the entry's shard (one cluster slot): a job is answered and
        # dead-lettered where it was queued (intake refuses misrouted jobs unanswered).
        shard = self._keys.shard_of_key(stream) or 0
        none = self._keys.no_key(shard)
        dead_stream = self._keys.dead_letter_of(shard) if dead_letter else none
        keys = [self._keys.result(job_id, shard), reply_to or none, stream, dead_stream]
        args = [payload, self._ttl, self._maxlen, self._keys.group, entry_id, DEAD_LETTER_MAXLEN]
        args += [len(duplicates), *(part for ref in duplicates for part in ref)]
        for name, value in (dead_letter or {}).items():
            args += [name, value]
        self._queue(lambda pipe: self._eval_final(pipe, keys, args), on_done, final=True)

    def _eval_final(self, pipe: Any, keys: list[str], args: list[Any]) -> None:
        # The pipeline loads registered scripts before it runs (once per Redis restart).
        queue_script(pipe, self._script, keys, args)

    def _timings(self, state: JobState) -> dict[str, float]:
        enqueued = entry_time_ms(state.entry_id)
        end = now_ms()
        timings = {"total_ms": round(max(0.0, end - enqueued), 1)}
        if state.started_ms is not None:
            timings["queued_ms"] = round(max(0.0, state.started_ms - enqueued), 1)
        if state.first_token_ms is not None:
            timings["ttft_ms"] = round(max(0.0, state.first_token_ms - enqueued), 1)
        return timings

    # -- batching and writing ------------------------------------------------------

    def _queue(
        self,
        apply: Callable[[Any], None],
        on_done: Callable[[bool], None] | None = None,
        *,
        final: bool = False,
    ) -> None:
        self._ops.append(_Op(apply, on_done, final))
        self._idle.clear()
        self._wake.set()

    def ack(self, entry: EntryRef, on_done: Callable[[], None] | None = None) -> None:
        """Ack and delete an entry that needs no result (its job's final result exists, or is
        queued before this ack: ops are written in order)."""
        (stream, entry_id), group = entry, self._keys.group
        done = None if on_done is None else lambda _ok: on_done()
        self._queue(lambda pipe: pipe.eval(_ACK_DELETE_LUA, 1, stream, group, entry_id), done)

    def ack_duplicate(self, holder: JobState, entry: EntryRef) -> None:
        """Ack another entry of a job that `holder` is running; it is deleted with the final
        result (until then a producer locating that entry still finds it queued)."""
        if holder.done:
            self.ack(entry)  # its final result is queued already
            return
        holder.duplicates.append(entry)
        (stream, entry_id), group = entry, self._keys.group
        self._queue(lambda pipe: pipe.xack(stream, group, entry_id))

    async def run(self) -> None:
        """Flusher: write everything queued, in one pipeline per wake-up, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._ops = self._ops, []
            if batch:
                # Shielded: cancelling the service must not cut a batch of results + acks in half.
                await asyncio.shield(self._write(batch))
            if not self._ops:
                self._idle.set()

    async def _execute(self, batch: list[_Op]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for op in batch:
            op.apply(pipe)
        return await pipe.execute(raise_on_error=False)

    async def wait_idle(self) -> None:
        """Return once everything queued so far is written."""
        await self._idle.wait()

    async def _write(self, batch: list[_Op]) -> None:
        # Retried until Redis is back: the results and acks of finished jobs must not be lost.
        replies = await self._retry.call("writing results", lambda: self._execute(batch))
        again = [
            op for op, reply in zip(batch, replies, strict=True) if isinstance(reply, TRANSIENT)
        ]
        if again:
            # A cluster failover under way: those commands did not run; written with the next batch.
            first = next(r for r in replies if isinstance(r, TRANSIENT))
            log.warning("%d redis commands refused for now (%r); retrying", len(again), first)
            self._ops[:0] = again
            self._wake.set()
            await asyncio.sleep(_REFUSED_RETRY_S)
        for op, reply in zip(batch, replies, strict=True):
            if isinstance(reply, TRANSIENT):
                continue
            failed = isinstance(reply, Exception)
            if failed:
                # Not acked: once released it goes idle, is reclaimed and retried (or dead-lettered).
                log.error("redis command failed: %r", reply)
            elif op.final:
                self.num_published += reply == 1
                self.num_duplicates += reply != 1
            if op.on_done is not None:
                # For a final op: did this write publish the job's first final result?
                op.on_done(not failed and (not op.final or reply == 1))


@dataclass(frozen=True)
class _Op:
    """One queued pipeline command; `final` ops are the publish-and-ack script."""

    apply: Callable[[Any], None]
    on_done: Callable[[bool], None] | None
    final: bool = False
