"""Wire protocol v1 (boundary of producer → Redis stream → worker.service.intake and worker.service.publish → client).

A job is one stream entry with field `job` = msgpack map; a result is one entry
with field `result` = msgpack map. Jobs are validated strictly here, once, so
bad input becomes a `JobDecodeError` carrying a stable code plus whatever
id/reply_to could be salvaged, and the worker can still answer. Results are
decoded leniently (unknown fields ignored) so old clients survive new workers.
See docs/protocol.md.

NOTE: ~340 lines: the whole wire format (both directions, strict and lenient) in one file,
the one place a client author needs to read.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, fields
from typing import Any

import msgpack

from worker.errors import RequestError
from worker.params import SamplingParams, check_length_hint

PROTOCOL_VERSION = 1
MAX_ID_CHARS = 256
MAX_REPLY_TO_CHARS = 512
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 20

STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_CANCELLED = "cancelled"
STATUS_PARTIAL = "partial"
FINAL_STATUSES = frozenset({STATUS_OK, STATUS_ERROR, STATUS_CANCELLED})
STATUSES = FINAL_STATUSES | {STATUS_PARTIAL}

# Wire name → Job attribute (the wire says `deadline`, in unix ms).
_JOB_WIRE_NAMES = {
    "v": "v",
    "id": "id",
    "reply_to": "reply_to",
    "prompt": "prompt",
    "messages": "messages",
    "prompt_token_ids": "prompt_token_ids",
    "params": "params",
    "stream": "stream",
    "deadline": "deadline_ms",
    "priority": "priority",
    "length_hint": "length_hint",
}
_PROMPT_KINDS = ("prompt", "messages", "prompt_token_ids")
_MESSAGE_KEYS = frozenset({"role", "content"})  # as worker.engine.prompts accepts


@dataclass(frozen=True)
class Job:
    """One generation job. Exactly one of prompt / messages / prompt_token_ids is set.

    params: the engine's sampling parameters by name (validated by SamplingParams).
    deadline_ms: unix time in ms; a job not started by then gets `deadline_exceeded`.
    length_hint: the producer's guess of how many tokens the job will generate; predicted-
        length admission uses it instead of what the worker learnt (bounded by max_tokens).
    """

    id: str
    reply_to: str
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    deadline_ms: int | None = None
    priority: int = 0
    length_hint: int | None = None
    v: int = PROTOCOL_VERSION

    def sampling_params(self) -> SamplingParams:
        return SamplingParams.from_dict(self.params)


@dataclass(frozen=True)
class Result:
    """A result (final: ok / error / cancelled) or a token delta (partial).

    usage: {prompt_tokens, completion_tokens}; timings: {queued_ms, ttft_ms, total_ms};
    error: {code, message}; attempt: delivery count of the job (1 = first run).
    reused: set by the producer client, never on the wire: True when this client's
        submission of the id queued nothing because the id had been submitted before
        (ids are idempotency keys), so this is the earlier submission's result.
    """

    id: str
    status: str
    v: int = PROTOCOL_VERSION
    text: str | None = None
    delta: str | None = None
    token_ids: tuple[int, ...] | None = None
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    timings: dict[str, float] | None = None
    error: dict[str, str] | None = None
    worker: str | None = None
    attempt: int | None = None
    logprobs: list[Any] | None = None
    reused: bool = False

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def error_code(self) -> str | None:
        return self.error.get("code") if self.error else None


_CLIENT_ONLY_FIELDS = frozenset({"reused"})
_RESULT_FIELDS = tuple(f.name for f in fields(Result) if f.name not in _CLIENT_ONLY_FIELDS)


class JobDecodeError(Exception):
    """A job that cannot run; job_id / reply_to are set when they could be salvaged."""

    def __init__(self, error: RequestError, job_id: str | None, reply_to: str | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.job_id = job_id
        self.reply_to = reply_to

    @property
    def code(self) -> str:
        return self.error.code


def error_result(job_id: str, error: RequestError, **extra: Any) -> Result:
    """The final `error` result for a RequestError (extra: worker, attempt, timings...)."""
    return Result(id=job_id, status=STATUS_ERROR, error=error.to_dict(), **extra)


def new_job_id() -> str:
    return uuid.uuid4().hex


def encode_job(job: Job) -> bytes:
    """Job → msgpack map; v, id, reply_to first so a truncated payload still names them."""
    wire: dict[str, Any] = {"v": job.v, "id": job.id, "reply_to": job.reply_to}
    for kind in _PROMPT_KINDS:
        value = getattr(job, kind)
        if value is not None:
            wire[kind] = list(value) if isinstance(value, tuple) else value
    if job.params:
        wire["params"] = job.params
    if job.stream:
        wire["stream"] = True
    if job.deadline_ms is not None:
        wire["deadline"] = job.deadline_ms
    if job.priority:
        wire["priority"] = job.priority
    if job.length_hint is not None:
        wire["length_hint"] = job.length_hint
    return msgpack.packb(wire, use_bin_type=True)


def decode_job(payload: bytes, *, max_bytes: int, default_id: str | None = None) -> Job:
    """Validate one `job` field value.

    default_id: id used when the job carries none; workers pass something stable
    per stream entry (e.g. its entry id) so a redelivered job keeps its id.
    Raises:
        JobDecodeError with code payload_too_large, invalid_request, invalid_utf8,
        invalid_params or empty_prompt.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise JobDecodeError(
            RequestError("invalid_request", "job must be msgpack bytes"), None, None
        )
    payload = bytes(payload)
    if len(payload) > max_bytes:
        err = RequestError("payload_too_large", f"job is {len(payload)} bytes, limit {max_bytes}")
        raise JobDecodeError(err, *_salvage_ids(payload))
    try:
        raw = msgpack.unpackb(payload, raw=False, use_list=True)
    except UnicodeDecodeError:
        err = RequestError("invalid_utf8", "a string in the job is not valid UTF-8")
        raise JobDecodeError(err, *_salvage_ids(payload)) from None
    except Exception as exc:  # msgpack raises ValueError, FormatError, StackError, ExtraData...
        err = RequestError("invalid_request", f"job is not one msgpack map: {type(exc).__name__}")
        raise JobDecodeError(err, *_salvage_ids(payload)) from None
    if not isinstance(raw, dict):
        raise JobDecodeError(RequestError("invalid_request", "job must be a map"), None, None)
    job_id, reply_to = _valid_id(raw.get("id")), _valid_reply_to(raw.get("reply_to"))
    try:
        return _build_job(raw, job_id or default_id or new_job_id())
    except RequestError as err:
        raise JobDecodeError(err, job_id or default_id, reply_to) from None


def _build_job(raw: dict[str, Any], job_id: str) -> Job:
    unknown = sorted(str(k) for k in raw if k not in _JOB_WIRE_NAMES)
    if unknown:
        _fail(f"unknown field(s): {', '.join(unknown)}")
    v = raw.get("v")
    # The integer 1: in Python 1.0 and True equal 1 too, but they are not ints on the wire.
    if type(v) is not int or v != PROTOCOL_VERSION:
        _fail(f"v must be {PROTOCOL_VERSION} (got {v!r})")
    if "id" in raw and _valid_id(raw["id"]) is None:
        _fail(f"id must be a non-empty string of at most {MAX_ID_CHARS} characters")
    reply_to = _valid_reply_to(raw.get("reply_to"))
    if reply_to is None:
        _fail(f"reply_to must be a non-empty string of at most {MAX_REPLY_TO_CHARS} characters")
    kinds = [k for k in _PROMPT_KINDS if raw.get(k) is not None]
    if len(kinds) != 1:
        _fail(f"exactly one of prompt, messages, prompt_token_ids is required (got {kinds})")
    params = raw.get("params")
    params = {} if params is None else params
    SamplingParams.from_dict(params)  # raises invalid_params, naming the field
    return Job(
        id=job_id,
        reply_to=reply_to,
        prompt=_check_prompt(raw.get("prompt")),
        messages=_check_messages(raw.get("messages")),
        prompt_token_ids=_check_token_ids(raw.get("prompt_token_ids")),
        params=params,
        stream=_check_type(raw, "stream", bool, False),
        deadline_ms=_check_deadline(raw.get("deadline")),
        priority=_check_type(raw, "priority", int, 0),
        length_hint=check_length_hint(raw.get("length_hint")),
    )


def _fail(message: str, code: str = "invalid_request") -> None:
    raise RequestError(code, message)


def _check_type(raw: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = raw.get(name)
    if value is None:
        return default
    # bool is an int in Python; `true` must not pass as priority 1 (nor 1 as a bool).
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        _fail(f"{name} must be {kind.__name__}")
    return value


def _check_prompt(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        _fail("prompt must be a string")
    if not value:
        _fail("prompt is empty", "empty_prompt")
    return value


def _check_messages(value: Any) -> tuple[dict[str, str], ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        _fail("messages must be a list of {role, content} maps")
    if not value:
        _fail("messages is empty", "empty_prompt")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or msg.keys() != _MESSAGE_KEYS:
            _fail(f"messages[{i}] must be a map of exactly role and content")
        if not all(isinstance(v, str) for v in msg.values()):
            _fail(f"messages[{i}] role and content must be strings")
    return tuple(value)


def _check_token_ids(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in value
    ):
        _fail("prompt_token_ids must be a list of non-negative integers")
    if not value:
        _fail("prompt_token_ids is empty", "empty_prompt")
    return tuple(value)


def _check_deadline(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _fail("deadline must be a non-negative integer (unix ms)")
    return value


def _valid_id(value: Any) -> str | None:
    return value if _utf8_str(value) and 0 < len(value) <= MAX_ID_CHARS else None


def _valid_reply_to(value: Any) -> str | None:
    return value if _utf8_str(value) and 0 < len(value) <= MAX_REPLY_TO_CHARS else None


def _utf8_str(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")  # surrogates from salvaged invalid UTF-8 fail here
    except UnicodeEncodeError:
        return False
    return True


def _salvage_ids(payload: bytes) -> tuple[str | None, str | None]:
    """Best effort: read the top-level map pair by pair until it breaks; keep id/reply_to."""
    unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape", max_buffer_size=0)
    unpacker.feed(payload)
    found: dict[str, Any] = {}
    try:
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            value = unpacker.unpack()
            if key in ("id", "reply_to"):
                found[key] = value
    except Exception:  # truncated or malformed: keep what was read before the damage
        pass
    return _valid_id(found.get("id")), _valid_reply_to(found.get("reply_to"))


def encode_result(result: Result) -> bytes:
    """Result → msgpack map, omitting None fields."""
    wire = {}
    for name in _RESULT_FIELDS:
        value = getattr(result, name)
        if value is not None:
            wire[name] = list(value) if isinstance(value, tuple) else value
    return msgpack.packb(wire, use_bin_type=True)


def decode_result(payload: bytes) -> Result:
    """msgpack map → Result; unknown fields are ignored (forward compatible).

    Raises:
        ValueError if the payload is not a map with string `id` and a known `status`.
    """
    raw = msgpack.unpackb(payload, raw=False)
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), str):
        raise ValueError("result must be a map with a string id")
    if raw.get("status") not in STATUSES:
        raise ValueError(f"unknown result status {raw.get('status')!r}")
    known = {k: v for k, v in raw.items() if k in _RESULT_FIELDS}
    if isinstance(known.get("token_ids"), list):
        known["token_ids"] = tuple(known["token_ids"])
    return Result(**known)
