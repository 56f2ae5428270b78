"""Sequence: the engine's bookkeeping for one request (plain ints and lists, no tensors).

Also the small frozen types that cross the engine boundary: Request in,
TokenOutput out of each step, Completion out of `Engine.generate`.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from worker.engine.block_allocator import BlockKey, block_key
from worker.errors import RequestError
from worker.params import SamplingParams


@dataclass(frozen=True)
class Request:
    """A validated, tokenized request ready for the engine.

    length_hint: the producer's guess of the output length (job field `length_hint`);
    predicted-length admission uses it instead of what it learnt from finished requests.
    priority: higher is admitted first, then earlier `arrival_time` (a `time.monotonic()`
    value; the worker backdates it to the job's enqueue time so that aging counts the wait
    in Redis too).
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = field(default_factory=time.monotonic)
    length_hint: int | None = None
    priority: int = 0


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprob of the chosen token and the top-N alternatives (token id → logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class TokenOutput:
    """What one step produced for one request: new tokens and, if done, why.

    finish_reason: None while running; "stop" (EOS, stop token or stop string),
    "length" (max_tokens or context full), "abort" (cancelled), "error" (the engine
    failed on this request: `error` says how; its tokens are not a result).
    """

    request_id: str
    new_token_ids: tuple[int, ...]
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprobs, ...] = ()
    num_prompt_tokens: int = 0
    error: RequestError | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Completion:
    """The final result of one request from `Engine.generate`."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    usage: Usage
    logprobs: tuple[TokenLogprobs, ...] | None = None
    error: dict[str, str] | None = None


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Mutable per-request state owned by the scheduler.

    `num_computed_tokens` counts tokens whose K/V are in the cache; the tokens
    still to feed are `all_token_ids[num_computed_tokens:]`. After a preemption
    it drops to 0 and prompt + generated tokens are prefilled again (recompute), less
    whatever the prefix cache still holds.

    `block_ids[:num_cached_blocks]` are pages already offered to the prefix cache (full and
    computed); `block_keys` caches their chained keys, grown as pages fill.

    `predicted_num_tokens`: prompt + predicted output, set at admission under predicted-length
    admission (None: no prediction, or fcfs).
    """

    def __init__(self, request: Request) -> None:
        self.request_id = request.request_id
        self.prompt_token_ids = list(request.prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = request.params
        self.arrival_time = request.arrival_time
        self.length_hint = request.length_hint
        self.predicted_num_tokens: int | None = None
        self.priority = request.priority
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        self.num_cached_blocks = 0
        self._block_keys: list[BlockKey] = []

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    def block_keys(self, block_size: int, num_blocks: int) -> list[BlockKey]:
        """Prefix-cache keys of the first `num_blocks` pages, which must be full."""
        keys = self._block_keys
        if len(keys) < num_blocks:
            if num_blocks * block_size > self.num_tokens:
                raise ValueError(f"page {num_blocks - 1} of {self!r} is not full")
            tokens = self.all_token_ids
            for i in range(len(keys), num_blocks):
                parent = keys[-1] if keys else None
                keys.append(block_key(parent, tokens[i * block_size : (i + 1) * block_size]))
        return keys[:num_blocks]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, status={self.status.value})"
        )
