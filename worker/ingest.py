"""Ingest stage: XREADGROUP with backpressure, decode and validate at the boundary, tokenize off-loop.

Reads only as many entries as the caller has room for, so un-started jobs held
in memory stay bounded, from the priority levels' streams in their read order
(worker/levels.py): a lower level gets only the room the higher ones left.
Decoding is cheap and synchronous; tokenization (chat templates included) runs in
a thread pool, one call per read batch, on private tokenizer copies (a fast
tokenizer must not be shared with the publish stage's decoding across threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from worker.config import SchedulerConfig
from worker.engine.prompts import encode_prompt
from worker.errors import RequestError
from worker.keys import Keys
from worker.levels import LevelReader
from worker.protocol import Job, JobDecodeError, decode_job
from worker.recovery import Entry, entry_from_fields
from worker.resilience import TRANSIENT, Backoff

log = logging.getLogger(__name__)

_POLL_S = 0.5

# Screening verdicts for a decoded job, before it costs any tokenization.
RUN = "run"
ALREADY_DONE = "done"
CANCELLED = "cancelled"


@dataclass(frozen=True)
class Tokenized:
    """Prompt token ids of one job, or why it cannot run."""

    token_ids: tuple[int, ...] = ()
    error: RequestError | None = None


class Ingest:
    """Reads and prepares jobs for one consumer of the requests group."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        consumer: str,
        *,
        tokenizer: Any,
        max_model_len: int,
        vocab_size: int,
        max_payload_bytes: int,
        priority_aging_s: float = SchedulerConfig.priority_aging_s,
        threads: int = 1,
    ) -> None:
        self._redis = client
        self._keys = keys
        self._consumer = consumer
        self._tokenizer = tokenizer
        self._max_model_len = max_model_len
        self._vocab_size = vocab_size
        self._max_payload_bytes = max_payload_bytes
        self._levels = LevelReader(client, keys, priority_aging_s)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="headrace-tokenize")
        self._local = threading.local()
        self.num_read = 0

    async def ensure_group(self) -> None:
        """Create the consumer group (and the stream) of each priority level unless it exists."""
        for stream in self._keys.request_streams:
            try:
                await self._redis.xgroup_create(stream, self._keys.group, id="0", mkstream=True)
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def read(self, count: int, block_ms: int | None) -> list[Entry]:
        """Up to `count` never-delivered entries, waiting at most `block_ms` for the first.

        Streams are read one by one in their read order, each for the room still left;
        only when all are empty does one blocking read wait on all of them (one entry
        each: in a race with several producers the room can be overrun by a level or two).
        A missing group (NOGROUP) raises: the caller re-creates it (worker/resilience.py).
        """
        if count <= 0:
            return []
        entries: list[Entry] = []
        for stream in await self._levels.order():
            if len(entries) >= count:
                break
            entries += await self._read({stream: ">"}, count - len(entries), None)
        if not entries and block_ms is not None:
            streams = dict.fromkeys(await self._levels.order(), ">")
            entries = await self._read(streams, 1, block_ms)
        self.num_read += len(entries)
        return entries

    async def _read(self, streams: dict[str, str], count: int, block_ms: int | None) -> list[Entry]:
        reply = await self._redis.xreadgroup(
            self._keys.group, self._consumer, streams, count=count, block=block_ms
        )
        return [
            entry_from_fields(_text(stream), entry_id, fields, attempt=1)
            for stream, messages in reply or ()
            for entry_id, fields in messages
            if entry_id is not None
        ]

    def decode(self, entry: Entry) -> Job:
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
            job = decode_job(
                entry.payload, max_bytes=self._max_payload_bytes, default_id=entry.entry_id
            )
        except JobDecodeError as err:
            # The error path too: an invalid job's answer must not land in our own keys.
            if err.reply_to is not None and not self._keys.may_reply_to(err.reply_to):
                raise JobDecodeError(err.error, err.job_id, None) from None
            raise
        if not self._keys.may_reply_to(job.reply_to):
            # Answering there would feed results into the worker's own queues or markers
            # (a reply_to of `{ns}:cancelled:X` would cancel someone else's job).
            bad = RequestError(
                "invalid_request",
                f"reply_to must not be a key of namespace {self._keys.namespace!r} "
                "other than its reply streams",
            )
            raise JobDecodeError(bad, job.id, None)
        return job

    async def screen(self, jobs: Sequence[Job]) -> list[str]:
        """RUN, ALREADY_DONE (its final result exists) or CANCELLED, per job; one round trip."""
        if not jobs:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for job in jobs:
            pipe.exists(self._keys.result(job.id))
            pipe.exists(self._keys.cancelled(job.id))
        flags = await pipe.execute()
        verdicts = []
        for i in range(len(jobs)):
            done, cancelled = flags[2 * i], flags[2 * i + 1]
            verdicts.append(ALREADY_DONE if done else CANCELLED if cancelled else RUN)
        return verdicts

    @staticmethod
    def expired(job: Job) -> RequestError | None:
        if job.deadline_ms is not None and time.time() * 1000 > job.deadline_ms:
            return RequestError("deadline_exceeded", "the job's deadline passed before it started")
        return None

    async def tokenize(self, jobs: Sequence[Job]) -> list[Tokenized]:
        """Prompt token ids for each job, computed in the thread pool in one batch."""
        if not jobs:
            return []
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._tokenize_batch, list(jobs))

    def _tokenize_batch(self, jobs: list[Job]) -> list[Tokenized]:
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self._local.tokenizer = copy.deepcopy(self._tokenizer)
        out = []
        for job in jobs:
            try:
                params = job.sampling_params()
                ids = encode_prompt(
                    tokenizer,
                    prompt=job.prompt,
                    messages=list(job.messages) if job.messages is not None else None,
                    prompt_token_ids=list(job.prompt_token_ids)
                    if job.prompt_token_ids is not None
                    else None,
                    max_model_len=self._max_model_len,
                    vocab_size=self._vocab_size,
                    special_tokens_in_content=params.special_tokens_in_content,
                )
                params.check_vocab(self._vocab_size)
                out.append(Tokenized(tuple(ids)))
            except RequestError as err:
                out.append(Tokenized(error=err))
            except Exception as exc:  # a tokenizer bug on one job must not fail the batch
                log.exception("tokenizing job %s failed", job.id)
                out.append(
                    Tokenized(error=RequestError("internal", f"tokenization failed: {exc!r}"))
                )
        return out

    async def listen_cancels(
        self,
        on_cancel: Callable[[str], None],
        subscribed: asyncio.Event,
        closing: asyncio.Event,
        held: Callable[[], Collection[str]],
    ) -> None:
        """Call `on_cancel(job_id)` for each message on the cancel channel until `closing`.

        held: the ids of the jobs the worker holds. After each (re)subscription their
        cancel keys are checked, so a cancel sent while the subscription was down is not
        lost for a running job either.
        """
        backoff = Backoff()
        while not closing.is_set():
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._keys.cancel_channel)
                for job_id in await self._cancelled(list(held())):
                    on_cancel(job_id)
                subscribed.set()
                backoff.reset()
                while not closing.is_set():
                    message = await pubsub.get_message(timeout=_POLL_S)
                    if message is not None and message.get("type") == "message":
                        on_cancel(message["data"].decode(errors="replace"))
            except TRANSIENT as exc:
                log.warning("cancel subscription lost (%r); resubscribing", exc)
                await backoff.sleep(closing)
            finally:
                with contextlib.suppress(*TRANSIENT):
                    await pubsub.aclose()

    async def _cancelled(self, job_ids: list[str]) -> list[str]:
        if not job_ids:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.exists(self._keys.cancelled(job_id))
        return [job_id for job_id, hit in zip(job_ids, await pipe.execute(), strict=True) if hit]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
