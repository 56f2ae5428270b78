"""Intake stage: entries read from Redis → requests handed to the engine, or refusals.

An admitted entry is registered in the job table at once (so a cancel finds it),
then decoded and screened (already answered? cancelled? expired?), tokenized off
the loop, and started on the engine. An entry that cannot run (undecodable, or
delivered too many times) is refused: its error result is published and the entry
acked (and dead-lettered when nobody can be answered, or attempts ran out).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from worker.engine import OutputAccumulator, Request
from worker.errors import RequestError
from worker.keys import EntryRef, Keys
from worker.protocol import STATUS_CANCELLED, Job, JobDecodeError, decode_job
from worker.service.engine_loop import EngineLoop
from worker.service.jobs import JobState, JobTable, entry_time_ms, now_ms
from worker.service.metrics import Metrics
from worker.service.publish import Publisher
from worker.service.reader import ALREADY_DONE, CANCELLED, StreamReader
from worker.service.recovery import Entry, Recovery
from worker.service.resilience import Interrupted, Retrier, Supervisor
from worker.service.tokenizing import PromptEncoder

log = logging.getLogger(__name__)


def decode_entry(entry: Entry, keys: Keys, max_payload_bytes: int) -> Job:
    """Validate one entry's job. Raises JobDecodeError (with whatever ids were salvaged)."""
    if entry.deleted:
        gone = RequestError(
            "entry_deleted", "the stream entry was deleted (XDEL or trimming) before it ran"
        )
        raise JobDecodeError(gone, entry.entry_id, None)
    if entry.payload is None:
        missing = RequestError("invalid_request", "stream entry has no `job` field")
        raise JobDecodeError(missing, entry.entry_id, None)
    try:
        job = decode_job(entry.payload, max_bytes=max_payload_bytes, default_id=entry.entry_id)
    except JobDecodeError as err:
        # The error path too: an invalid job's answer must not land in our own keys.
        if err.reply_to is not None and not _may_answer(keys, entry, err.reply_to):
            raise JobDecodeError(err.error, err.job_id, None) from None
        raise
    if keys.shard_of(job.id) != keys.shard_of_key(entry.stream):
        # Its result key and a resubmission's claim live in another shard (another slot):
        # running it here could yield two final results. Refused, dead-lettered here.
        misrouted = RequestError(
            "invalid_request",
            f"job id {job.id!r} belongs to shard {keys.shard_of(job.id)} of {keys.shards}, "
            f"not to {entry.stream!r} (docs/protocol.md, Shards)",
        )
        raise JobDecodeError(misrouted, job.id, None)
    if not keys.may_reply_to(job.reply_to, job.id):
        # Answering there would feed results into the worker's own queues or markers
        # (a reply_to of `{ns}:cancelled:X` would cancel someone else's job).
        bad = RequestError(
            "invalid_request",
            f"reply_to must not be a key of namespace {keys.namespace!r} "
            "other than its reply streams",
        )
        raise JobDecodeError(bad, job.id, None)
    return job


def _may_answer(keys: Keys, entry: Entry, reply_to: str) -> bool:
    """An undecodable job's reply_to is answered only inside the entry's shard."""
    if not keys.tagged:
        return keys.may_reply_to(reply_to)
    return keys.may_reply_to(reply_to) and keys.shard_of_key(reply_to) == keys.shard_of_key(
        entry.stream
    )


def expired(job: Job) -> RequestError | None:
    if job.deadline_ms is not None and time.time() * 1000 > job.deadline_ms:
        return RequestError("deadline_exceeded", "the job's deadline passed before it started")
    return None


class Intake:
    """Admits entries as jobs (or refuses them) and starts them on the engine.

    Args:
        keys, max_payload_bytes, max_attempts: what decoding and dead-lettering check.
        jobs: the worker's job table (admitted jobs and refusals are registered there).
        reader, recovery, publisher, encoder, engine_loop: the stages it hands work to.
        retry: retries the screening round trip while Redis is away.
        spawn: runs a coroutine as a supervised background task.
        tokenizer: the engine's, for the jobs' output accumulators.
        closing: set when the worker shuts down (a screening retry then gives up).
        on_change: called when a refusal is written (the read loop may have room again).
    """

    def __init__(
        self,
        *,
        keys: Keys,
        max_payload_bytes: int,
        max_attempts: int,
        jobs: JobTable,
        reader: StreamReader,
        recovery: Recovery,
        publisher: Publisher,
        encoder: PromptEncoder,
        engine_loop: EngineLoop,
        metrics: Metrics,
        retry: Retrier,
        supervisor: Supervisor,
        tokenizer: object,
        closing: asyncio.Event,
        on_change: Callable[[], None],
    ) -> None:
        self._keys = keys
        self._max_payload_bytes = max_payload_bytes
        self._max_attempts = max_attempts
        self._jobs = jobs
        self._reader = reader
        self._recovery = recovery
        self._publisher = publisher
        self._encoder = encoder
        self._engine_loop = engine_loop
        self._metrics = metrics
        self._retry = retry
        self._supervisor = supervisor
        self._tokenizer = tokenizer
        self._closing = closing
        self._on_change = on_change
        self.num_refused = 0
        self.num_dead_lettered = 0

    def decode(self, entry: Entry) -> Job:
        return decode_entry(entry, self._keys, self._max_payload_bytes)

    def admit(self, entries: list[Entry]) -> int:
        """Register entries as in flight at once (so cancels find them), then prepare them.

        Returns how many entries there were (known ones included: they are skipped).
        """
        states = []
        for entry in entries:
            if self._jobs.refusing(entry.ref):
                continue  # our own refusal, reclaimed before its ack landed
            if self._recovery.exhausted(entry):
                self._dead_letter(entry)
                continue
            try:
                job = self.decode(entry)
            except JobDecodeError as err:
                self._reject(entry, err)
                continue
            holder = self._jobs.get(job.id)
            if holder is not None:
                # Our own entry reclaimed, or a resubmitted id: the running copy answers for it.
                if holder.ref != entry.ref:
                    self._publisher.ack_duplicate(holder, entry.ref)
                continue
            state = JobState(entry.entry_id, job, entry.attempt, entry.stream)
            self._jobs.add(state)
            states.append(state)
        if states:
            self._supervisor.spawn("prepare", self._prepare(states), loop=False)
        return len(entries)

    async def _prepare(self, states: list[JobState]) -> None:
        jobs = [s.job for s in states]
        try:
            # Retried in place: the entries stay claimed (heartbeat) and run once Redis is
            # back, with no delay and no extra delivery.
            verdicts = await self._retry.call(
                "screening jobs", lambda: self._reader.screen(jobs), stop=self._closing
            )
        except Interrupted:
            return  # shutting down: left pending for other workers
        runnable = []
        for state, verdict in zip(states, verdicts, strict=True):
            if verdict == ALREADY_DONE:
                state.mark_done()
                self._publisher.ack(state.ref, lambda s=state: self._release(s))
            elif verdict == CANCELLED or state.cancel_requested:
                self._publisher.final(state, STATUS_CANCELLED, "abort")
            elif (error := expired(state.job)) is not None:
                self._publisher.fail(state, error)
            else:
                runnable.append(state)
        tokenized = await self._encoder.tokenize([s.job for s in runnable])
        ready = []
        for state, tok in zip(runnable, tokenized, strict=True):
            if tok.error is not None:
                self._publisher.fail(state, tok.error)
            elif state.cancel_requested:
                self._publisher.final(state, STATUS_CANCELLED, "abort")
            else:
                ready.append((state, tok.token_ids))
        for state, token_ids in ready:  # the engine orders them by priority
            self._start(state, token_ids)

    def _start(self, state: JobState, token_ids: tuple[int, ...]) -> None:
        params = state.job.sampling_params()  # validated by decode_job, cannot raise here
        # Arrival backdated to the enqueue time: the engine's order and aging count the wait
        # in Redis too, so a job read late is not ranked behind newer ones of its priority.
        waited_s = max(0.0, now_ms() - entry_time_ms(state.entry_id)) / 1000
        request = Request(
            state.job.id,
            token_ids,
            params,
            arrival_time=time.monotonic() - waited_s,
            length_hint=state.job.length_hint,
            priority=state.job.priority,
        )
        # Incremental text only where deltas or stop strings need it: else one decode at the end.
        incremental = state.job.stream or bool(params.stop)
        state.start(request, OutputAccumulator(request, self._tokenizer, incremental=incremental))
        self._metrics.add_prompt_tokens(len(token_ids))
        self._engine_loop.add(request)

    def _release(self, state: JobState) -> None:
        self._jobs.release(state)
        self._on_change()

    # -- refusals -------------------------------------------------------------------------

    def _reject(self, entry: Entry, err: JobDecodeError) -> None:
        # Nobody to answer: keep the entry in the dead-letter stream for operators.
        job_id = err.job_id or entry.entry_id
        self._refuse(entry, err.error, job_id, err.reply_to, dead_letter=err.reply_to is None)

    def _dead_letter(self, entry: Entry) -> None:
        limit = self._max_attempts
        message = f"job was delivered {entry.attempt} times (max_attempts {limit})"
        log.warning("dead-lettering entry %s: %s", entry.entry_id, message)
        try:
            job = self.decode(entry)
            job_id, reply_to = job.id, job.reply_to
        except JobDecodeError as err:
            job_id, reply_to = err.job_id or entry.entry_id, err.reply_to
        error = RequestError("max_attempts_exceeded", message)
        self._refuse(entry, error, job_id, reply_to, dead_letter=True)

    def _refuse(
        self,
        entry: Entry,
        error: RequestError,
        job_id: str,
        reply_to: str | None,
        *,
        dead_letter: bool,
    ) -> None:
        fields = self._recovery.dead_letter_fields(entry, error) if dead_letter else None
        self._jobs.start_refusal(entry.ref)
        self._publisher.refuse(
            entry.ref,
            job_id,
            reply_to,
            error,
            entry.attempt,
            fields,
            lambda first: self._refused(entry.ref, first, dead_letter),
        )

    def _refused(self, entry: EntryRef, first: bool, dead_letter: bool) -> None:
        # Counted once written, and only by the write that published: under load an entry
        # can be reclaimed again while its refusal is in flight and be refused twice.
        self.num_refused += first
        self.num_dead_lettered += first and dead_letter
        self._jobs.end_refusal(entry)
        self._on_change()
