"""Protocol v1: job/result round trips, every decode_job error code, id/reply_to salvage."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.errors import RequestError
from worker.keys import Keys
from worker.protocol import (
    STATUSES,
    Job,
    JobDecodeError,
    Result,
    decode_job,
    decode_result,
    encode_job,
    encode_result,
    error_result,
)

MAX = 4096
# Surrogates are not valid UTF-8, so no honest producer can send them.
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
IDS = TEXT.filter(lambda s: len(s) > 0)
PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": st.integers(1, 4096),
        "temperature": st.floats(0, 2),
        "top_k": st.integers(0, 100),
        "seed": st.none() | st.integers(0, 2**62),
        "stop": st.lists(IDS, max_size=3),
        "ignore_eos": st.booleans(),
    },
)


@st.composite
def jobs(draw: st.DrawFn) -> Job:
    kind = draw(st.sampled_from(["prompt", "messages", "prompt_token_ids"]))
    prompt_fields: dict[str, Any] = {
        "prompt": IDS,
        "messages": st.lists(
            st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": TEXT}),
            min_size=1,
            max_size=3,
        ).map(tuple),
        "prompt_token_ids": st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=20).map(tuple),
    }
    return Job(
        id=draw(IDS),
        reply_to=draw(IDS),
        params=draw(PARAMS),
        stream=draw(st.booleans()),
        deadline_ms=draw(st.none() | st.integers(0, 2**62)),
        priority=draw(st.integers(-(2**31), 2**31)),
        length_hint=draw(st.none() | st.integers(1, 2**31)),
        **{kind: draw(prompt_fields[kind])},
    )


@given(jobs())
def test_job_round_trip(job: Job) -> None:
    assert decode_job(encode_job(job), max_bytes=MAX) == job


@st.composite
def results(draw: st.DrawFn) -> Result:
    opt = st.none
    return Result(
        id=draw(IDS),
        status=draw(st.sampled_from(sorted(STATUSES))),
        text=draw(opt() | TEXT),
        delta=draw(opt() | TEXT),
        token_ids=draw(opt() | st.lists(st.integers(0, 2**31)).map(tuple)),
        finish_reason=draw(opt() | st.sampled_from(["stop", "length", "abort"])),
        usage=draw(opt() | st.fixed_dictionaries({"prompt_tokens": st.integers(0, 10**6)})),
        timings=draw(opt() | st.fixed_dictionaries({"total_ms": st.floats(0, 1e6)})),
        error=draw(opt() | st.fixed_dictionaries({"code": TEXT, "message": TEXT})),
        worker=draw(opt() | TEXT),
        attempt=draw(opt() | st.integers(1, 100)),
    )


@given(results())
def test_result_round_trip(result: Result) -> None:
    assert decode_result(encode_result(result)) == result


def test_encode_result_omits_none_and_decode_ignores_unknown_fields() -> None:
    wire = msgpack.unpackb(encode_result(Result(id="a", status="ok", text="hi")))
    assert wire == {"v": 1, "id": "a", "status": "ok", "text": "hi"}
    newer = msgpack.packb({**wire, "added_in_v1_1": [1, 2]})
    assert decode_result(newer) == Result(id="a", status="ok", text="hi")
    # `reused` is the client's annotation: never written, never read from the wire.
    assert (
        msgpack.unpackb(encode_result(Result(id="a", status="ok", text="hi", reused=True))) == wire
    )
    assert decode_result(msgpack.packb({**wire, "reused": True})).reused is False


@pytest.mark.parametrize(
    "payload",
    [
        msgpack.packb([1, 2]),
        msgpack.packb({"id": "a"}),
        msgpack.packb({"id": "a", "status": "meh"}),
    ],
)
def test_decode_result_rejects_non_results(payload: bytes) -> None:
    with pytest.raises(ValueError):
        decode_result(payload)


def test_error_result_carries_code() -> None:
    result = error_result("j", RequestError("prompt_too_long", "too long"), attempt=2)
    assert (result.status, result.error_code, result.attempt, result.final) == (
        "error",
        "prompt_too_long",
        2,
        True,
    )


def _base(**changes: Any) -> dict[str, Any]:
    wire: dict[str, Any] = {"v": 1, "id": "job-1", "reply_to": "hr:reply:c", "prompt": "hi"}
    wire.update(changes)
    return {k: v for k, v in wire.items() if v is not _DROP}


_DROP = object()


def _decode_error(payload: Any, **kwargs: Any) -> JobDecodeError:
    with pytest.raises(JobDecodeError) as info:
        decode_job(payload, max_bytes=MAX, **kwargs)
    return info.value


def _bad_utf8(wire: dict[str, Any], marker: str) -> bytes:
    # Pack a placeholder, then swap its last byte for 0xff (never valid in UTF-8).
    packed = msgpack.packb(wire)
    return packed.replace(marker.encode(), marker[:-1].encode() + b"\xff")


# (payload, expected code, expected salvaged id, expected salvaged reply_to)
MALFORMED: dict[str, tuple[Any, str, str | None, str | None]] = {
    "not bytes": ("text", "invalid_request", None, None),
    "not msgpack": (b"\xc1\xc1", "invalid_request", None, None),
    "empty payload": (b"", "invalid_request", None, None),
    "msgpack list": (msgpack.packb(["hi"]), "invalid_request", None, None),
    "truncated": (msgpack.packb(_base(prompt="hello world"))[:-4], "invalid_request", "job-1", "hr:reply:c"),
    "trailing bytes": (msgpack.packb(_base()) + b"\x00", "invalid_request", "job-1", "hr:reply:c"),
    "deep nesting": (b"\x91" * 3000 + b"\x00", "invalid_request", None, None),
    "int map key": (msgpack.packb({1: 2, "id": "job-1"}), "invalid_request", "job-1", None),
    "missing prompt": (msgpack.packb(_base(prompt=_DROP)), "invalid_request", "job-1", "hr:reply:c"),
    "two prompt kinds": (msgpack.packb(_base(prompt_token_ids=[1])), "invalid_request", "job-1", "hr:reply:c"),
    "missing reply_to": (msgpack.packb(_base(reply_to=_DROP)), "invalid_request", "job-1", None),
    "missing v": (msgpack.packb(_base(v=_DROP)), "invalid_request", "job-1", "hr:reply:c"),
    "v2": (msgpack.packb(_base(v=2)), "invalid_request", "job-1", "hr:reply:c"),
    "v float": (msgpack.packb(_base(v=1.0)), "invalid_request", "job-1", "hr:reply:c"),
    "unknown field": (msgpack.packb(_base(model="gpt")), "invalid_request", "job-1", "hr:reply:c"),
    "prompt not str": (msgpack.packb(_base(prompt=7)), "invalid_request", "job-1", "hr:reply:c"),
    "prompt as bin": (msgpack.packb(_base(prompt=b"hi")), "invalid_request", "job-1", "hr:reply:c"),
    "id not str": (msgpack.packb(_base(id=5)), "invalid_request", None, "hr:reply:c"),
    "id too long": (msgpack.packb(_base(id="x" * 300)), "invalid_request", None, "hr:reply:c"),
    "stream not bool": (msgpack.packb(_base(stream=1)), "invalid_request", "job-1", "hr:reply:c"),
    "priority bool": (msgpack.packb(_base(priority=True)), "invalid_request", "job-1", "hr:reply:c"),
    "negative deadline": (msgpack.packb(_base(deadline=-1)), "invalid_request", "job-1", "hr:reply:c"),
    "zero length_hint": (msgpack.packb(_base(length_hint=0)), "invalid_request", "job-1", "hr:reply:c"),
    "length_hint bool": (msgpack.packb(_base(length_hint=True)), "invalid_request", "job-1", "hr:reply:c"),
    "length_hint float": (msgpack.packb(_base(length_hint=16.0)), "invalid_request", "job-1", "hr:reply:c"),
    "length_hint str": (msgpack.packb(_base(length_hint="16")), "invalid_request", "job-1", "hr:reply:c"),
    "token ids not ints": (msgpack.packb(_base(prompt=_DROP, prompt_token_ids=["a"])), "invalid_request", "job-1", "hr:reply:c"),
    "message extra key": (msgpack.packb(_base(prompt=_DROP, messages=[{"role": "user", "content": "x", "k": "v"}])), "invalid_request", "job-1", "hr:reply:c"),
    "message not map": (msgpack.packb(_base(prompt=_DROP, messages=["hi"])), "invalid_request", "job-1", "hr:reply:c"),
    "bad params type": (msgpack.packb(_base(params=[1])), "invalid_params", "job-1", "hr:reply:c"),
    "bad param value": (msgpack.packb(_base(params={"temperature": -1})), "invalid_params", "job-1", "hr:reply:c"),
    "unknown param": (msgpack.packb(_base(params={"beam": 4})), "invalid_params", "job-1", "hr:reply:c"),
    "special flag not bool": (msgpack.packb(_base(params={"special_tokens_in_content": "yes"})), "invalid_params", "job-1", "hr:reply:c"),
    "empty prompt": (msgpack.packb(_base(prompt="")), "empty_prompt", "job-1", "hr:reply:c"),
    "empty messages": (msgpack.packb(_base(prompt=_DROP, messages=[])), "empty_prompt", "job-1", "hr:reply:c"),
    "empty token ids": (msgpack.packb(_base(prompt=_DROP, prompt_token_ids=[])), "empty_prompt", "job-1", "hr:reply:c"),
    "bad utf8 prompt": (_bad_utf8(_base(prompt="abcQ"), "abcQ"), "invalid_utf8", "job-1", "hr:reply:c"),
    "bad utf8 id": (_bad_utf8(_base(id="idQ"), "idQ"), "invalid_utf8", None, "hr:reply:c"),
    "too large": (msgpack.packb(_base(prompt="x" * MAX)), "payload_too_large", "job-1", "hr:reply:c"),
}  # fmt: skip


@pytest.mark.parametrize("name", MALFORMED)
def test_decode_job_errors(name: str) -> None:
    payload, code, job_id, reply_to = MALFORMED[name]
    err = _decode_error(payload)
    assert (err.code, err.job_id, err.reply_to) == (code, job_id, reply_to)
    assert isinstance(err.error, RequestError) and err.error.message


def test_every_documented_decode_code_is_exercised() -> None:
    codes = {case[1] for case in MALFORMED.values()}
    assert codes == {
        "invalid_request",
        "invalid_params",
        "invalid_utf8",
        "empty_prompt",
        "payload_too_large",
    }


def test_missing_id_uses_default_id_else_a_fresh_one() -> None:
    payload = msgpack.packb(_base(id=_DROP))
    assert decode_job(payload, max_bytes=MAX, default_id="1700-0").id == "1700-0"
    first, second = (decode_job(payload, max_bytes=MAX).id for _ in range(2))
    assert first and second and first != second
    err = _decode_error(msgpack.packb(_base(id=_DROP, prompt=_DROP)), default_id="1700-0")
    assert err.job_id == "1700-0"


def test_decoded_params_validate_into_sampling_params() -> None:
    job = decode_job(msgpack.packb(_base(params={"max_tokens": 5, "stop": "\n"})), max_bytes=MAX)
    assert job.sampling_params().max_tokens == 5
    assert job.sampling_params().stop == ("\n",)


@pytest.mark.parametrize(
    ("params", "limit"),
    [
        ({"stop": ["x"] * 17}, "at most 16 strings"),
        ({"stop": ["y" * 4000, "z" * 97]}, "at most 4096 characters"),
        ({"stop_token_ids": list(range(257))}, "at most 256 ids"),
    ],
)
def test_list_params_are_bounded(params: dict[str, Any], limit: str) -> None:
    with pytest.raises(JobDecodeError) as info:
        decode_job(msgpack.packb(_base(params=params)), max_bytes=1 << 20)
    assert info.value.code == "invalid_params" and limit in str(info.value)


def test_stop_token_ids_are_checked_against_the_vocabulary() -> None:
    from worker.params import SamplingParams

    params = SamplingParams(stop_token_ids=(5, 2**64 - 1))
    params.check_vocab(2**64)  # every id fits
    with pytest.raises(RequestError) as info:
        params.check_vocab(100)
    assert info.value.code == "invalid_params"
    assert str(2**64 - 1) in str(info.value) and "[0, 100)" in str(info.value)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_escape_as_other_exceptions(payload: bytes) -> None:
    try:
        decode_job(payload, max_bytes=MAX)
    except JobDecodeError as err:
        assert err.code in {"invalid_request", "invalid_params", "invalid_utf8", "empty_prompt"}


@settings(max_examples=300)
@given(st.data())
def test_corrupted_valid_jobs_fail_cleanly(data: st.DataObject) -> None:
    payload = bytearray(encode_job(data.draw(jobs())))
    for _ in range(data.draw(st.integers(1, 4))):
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    try:
        decode_job(bytes(payload), max_bytes=MAX)
    except JobDecodeError as err:
        assert err.job_id is None or isinstance(err.job_id, str)
        assert err.reply_to is None or isinstance(err.reply_to, str)


def test_keys_are_namespaced() -> None:
    keys = Keys("hr")
    names = [
        keys.requests,
        keys.dead_letter,
        keys.cancel_channel,
        keys.workers,
        keys.result("j"),
        keys.cancelled("j"),
        keys.reply("c"),
        keys.worker("w"),
    ]
    assert all(name.startswith("hr:") for name in names) and len(set(names)) == len(names)
    assert keys.group == "headrace"
    with pytest.raises(ValueError):
        Keys("a:b")


def test_reply_to_may_name_reply_streams_and_foreign_keys_only() -> None:
    keys = Keys("hr")
    assert keys.may_reply_to(keys.reply("c1")) and keys.may_reply_to("other:inbox")
    assert keys.may_reply_to("hrx:requests")  # another namespace that shares a prefix
    for own in (keys.requests, keys.dead_letter, keys.result("j"), keys.cancelled("j"), "hr"):
        assert not keys.may_reply_to(own), own


def test_length_hint_is_decoded_and_reaches_the_job() -> None:
    job = decode_job(msgpack.packb(_base(length_hint=24)), max_bytes=MAX)
    assert job.length_hint == 24
    assert decode_job(msgpack.packb(_base()), max_bytes=MAX).length_hint is None
