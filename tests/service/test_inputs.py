"""Bad input never takes a worker down: each malformed job gets an error result (stable code), is acked."""

from __future__ import annotations

import time

import msgpack

from tests.worker_harness import (
    KEYS,
    MAX_MODEL_LEN,
    REPLY,
    InProcessWorker,
    finals,
    pending_count,
    push,
    wait_for,
    worker_config,
)
from worker.keys import JOB_FIELD

MAX_PAYLOAD = 16384


def pack(**fields) -> bytes:
    return msgpack.packb({"v": 1, "reply_to": REPLY, **fields}, use_bin_type=True)


def invalid_utf8_prompt(job_id: str) -> bytes:
    """A well-formed msgpack map whose prompt is a str holding bytes that are not UTF-8."""
    packer = msgpack.Packer(use_bin_type=True)
    head = packer.pack_map_header(4)
    head += packer.pack("v") + packer.pack(1)
    head += packer.pack("id") + packer.pack(job_id)
    head += packer.pack("reply_to") + packer.pack(REPLY)
    return head + packer.pack("prompt") + b"\xa2\xff\xfe"  # fixstr of 2 invalid bytes


# job id → (payload, expected error code); each names its id and reply_to, so it is answered.
ANSWERED = {
    "two-kinds": (pack(id="two-kinds", prompt="a", prompt_token_ids=[1]), "invalid_request"),
    "no-prompt": (pack(id="no-prompt"), "invalid_request"),
    "prompt-type": (pack(id="prompt-type", prompt=5), "invalid_request"),
    "extra-field": (pack(id="extra-field", prompt="a", colour="red"), "invalid_request"),
    "bad-version": (pack(id="bad-version", prompt="a", v=2), "invalid_request"),
    "bad-messages": (pack(id="bad-messages", messages=[{"role": "user"}]), "invalid_request"),
    "stream-type": (pack(id="stream-type", prompt="a", stream="yes"), "invalid_request"),
    "bad-param": (pack(id="bad-param", prompt="a", params={"temperature": -1}), "invalid_params"),
    "param-type": (pack(id="param-type", prompt="a", params={"max_tokens": "9"}), "invalid_params"),
    "unknown-param": (pack(id="unknown-param", prompt="a", params={"beam": 4}), "invalid_params"),
    "stop-id-vocab": (
        pack(
            id="stop-id-vocab", prompt="a", params={"stop_token_ids": [2**64 - 1], "min_tokens": 1}
        ),
        "invalid_params",
    ),
    "many-stops": (
        pack(id="many-stops", prompt="a", params={"stop": ["x"] * 17}),
        "invalid_params",
    ),
    "empty": (pack(id="empty", prompt=""), "empty_prompt"),
    "too-long": (pack(id="too-long", prompt_token_ids=[7] * MAX_MODEL_LEN), "prompt_too_long"),
    "long-text": (pack(id="long-text", prompt="hello " * 1100), "prompt_too_long"),
    "vocab": (pack(id="vocab", prompt_token_ids=[10**9]), "invalid_request"),
    "utf8": (invalid_utf8_prompt("utf8"), "invalid_utf8"),
    "big": (pack(id="big", prompt="x" * (2 * MAX_PAYLOAD)), "payload_too_large"),
    "truncated": (pack(id="truncated", prompt="cut here")[:-3], "invalid_request"),
    "expired": (
        pack(id="expired", prompt="a", deadline=int(time.time() * 1000) - 1),
        "deadline_exceeded",
    ),
}
# No reply_to can be salvaged: these go to the dead-letter stream instead.
UNANSWERABLE = {
    "not-msgpack": (b"\xc1\xc1 not msgpack", "invalid_request"),
    "not-a-map": (msgpack.packb([1, 2, 3]), "invalid_request"),
    "no-reply-to": (msgpack.packb({"v": 1, "id": "x", "prompt": "a"}), "invalid_request"),
    "reply-to-queue": (pack(id="loop", prompt="a", reply_to=KEYS.requests), "invalid_request"),
    "reply-to-marker": (
        pack(id="marker", prompt="a", reply_to=KEYS.cancelled("victim")),
        "invalid_request",
    ),
    "reply-to-result": (
        pack(id="res", prompt="a", reply_to=KEYS.result("someone-else")),
        "invalid_request",
    ),
    # Invalid as well: its error must not be written to our dead-letter stream as a reply.
    "bad-job-reply-to-dead": (
        pack(id="bad-dead", prompt=5, reply_to=KEYS.dead_letter),
        "invalid_request",
    ),
}


def test_malformed_jobs_get_error_results_and_the_worker_keeps_serving(engine, redis_url, client):
    config = worker_config(redis_url, engine.config, max_payload_bytes=MAX_PAYLOAD)
    with InProcessWorker(config, engine) as worker:
        push(client, [payload for payload, _ in ANSWERED.values()])
        push(client, [payload for payload, _ in UNANSWERABLE.values()])
        client.xadd(KEYS.requests, {"not-job": b"x"})  # an entry without the `job` field
        wait_for(lambda: len(finals(client)) >= len(ANSWERED), 30, "error results")
        wait_for(lambda: client.xlen(KEYS.dead_letter) >= len(UNANSWERABLE) + 1, 30, "dead letters")

        got = finals(client)
        assert set(got) == set(ANSWERED)
        for job_id, (_, code) in ANSWERED.items():
            [res] = got[job_id]
            assert (res.status, res.error_code) == ("error", code), (job_id, res.error)
            assert res.error["message"] and res.worker == config.consumer
        dead = [fields for _, fields in client.xrange(KEYS.dead_letter)]
        assert {d[b"code"] for d in dead} == {b"invalid_request"}
        assert {d[JOB_FIELD.encode()] for d in dead} >= {p for p, _ in UNANSWERABLE.values()}

        # No key of the namespace other than reply streams was written as a reply.
        assert not client.exists(KEYS.cancelled("victim")), client.type(KEYS.cancelled("victim"))
        assert not client.exists(KEYS.result("someone-else"))
        assert all(d.get(b"result") is None for _, d in client.xrange(KEYS.dead_letter))

        # Still alive and serving, and nothing was left pending.
        push(client, [pack(id="fine", prompt="Hello", params={"max_tokens": 3})])
        wait_for(lambda: "fine" in finals(client), 30, "the valid job")
        assert finals(client)["fine"][0].status == "ok"
        wait_for(lambda: pending_count(client) == 0, 10, "all entries acked")
        assert worker.stop() == 0
    client.close()
