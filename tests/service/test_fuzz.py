"""Seeded fuzz of a real worker: adversarial stream entries interleaved with valid jobs never fail a
valid job, never write into the namespace's own keys, leave nothing pending and leave the worker
serving (issue 12). Every expectation comes from docs/protocol.md."""

from __future__ import annotations

import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
import redis

from tests.worker_harness import (
    KEYS,
    MAX_MODEL_LEN,
    REPO_ROOT,
    InProcessWorker,
    finals,
    pending_count,
    push,
    wait_for,
    worker_config,
)
from worker.engine.prompts import PROMPT_FIELDS
from worker.keys import JOB_FIELD
from worker.params import MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from worker.protocol import MAX_ID_CHARS, MAX_REPLY_TO_CHARS, Result, decode_result

NS = KEYS.namespace
MAX_PAYLOAD = 16384
DRAWN = 100  # random bytes, truncated and trailing-bytes entries
# Kinds of outcome an entry must get (docs/protocol.md, Error codes and Dead letter).
OK = "ok"  # a valid job: one final `ok` result on its reply_to
ANSWER = "answer"  # a bad job naming a usable id/reply_to: one final error result there
DEAD = "dead"  # nobody to answer: one dead-letter entry, no result on any stream
STORED = "stored"  # valid, but reply_to is a non-stream key: result kept in {ns}:result:{id}
# Legal reply_to names: reply streams of the namespace and anything outside it.
LEGAL = (
    KEYS.reply("fuzz-a"),
    KEYS.reply("fuzz-b"),
    KEYS.reply(""),
    "fuzz:replies",
    f"{NS}2:requests",  # another namespace's queue name is not ours
    "fuzz:réponses",
    "r" * MAX_REPLY_TO_CHARS,
)
NOT_A_STREAM = "fuzz:string-key"  # legal (outside the namespace) but a string: XADD fails
FORBIDDEN = (
    KEYS.requests,
    KEYS.dead_letter,
    KEYS.workers,
    KEYS.worker("w"),
    KEYS.cancel_channel,
    KEYS.submitted("x"),
    NS,
    f"{NS}:",
    "",
    "r" * (MAX_REPLY_TO_CHARS + 1),
)
WORDS = ("Hello", "the", "quick", "brown", "fox", "héllo", "世界", "\n", "<|im_start|>", "🙂")
U64_MAX = (1 << 64) - 1  # the largest msgpack integer
EXT = msgpack.ExtType(5, b"xx")


def documented_codes() -> set[str]:
    """The codes of the "Error codes (stable)" table of docs/protocol.md."""
    text = (REPO_ROOT / "docs" / "protocol.md").read_text()
    section = text.split("## Error codes (stable)", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z0-9_]+)` \|", section, re.MULTILINE))


@dataclass
class Case:
    """One stream entry and what the docs promise it gets; job_id None means the entry id."""

    kind: str
    fields: dict[str, bytes]
    outcome: str
    job_id: str | None
    reply_to: str | None
    codes: tuple[str, ...] = ()  # the error codes it may get; () for any documented one
    entry_id: str = ""

    def allows(self, code: str) -> bool:
        return not self.codes or code in self.codes

    @property
    def answer_id(self) -> str:
        return self.job_id if self.job_id is not None else self.entry_id


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


SAME = object()  # Fuzzer.case: take the id / reply_to from the map
DROP = object()  # Fuzzer.valid_map: remove the field


class Fuzzer:
    """Builds entries from one seeded Random; ids are unique so exactly-once is checkable.

    Every wrong value of every field (WRONG_TYPES, bad_params...) gets one entry of its own;
    random bytes, truncations and valid jobs are drawn; the order is shuffled.
    """

    def __init__(self, seed: int, vocab: int) -> None:
        self.rng = random.Random(seed)
        self.vocab = vocab
        self.seed = seed
        self.n = 0

    def new_id(self, kind: str) -> str:
        self.n += 1
        return f"f{self.seed}-{self.n}-{kind}"

    # -- valid jobs --------------------------------------------------------------------

    def prompt_kind(self) -> dict[str, Any]:
        rng = self.rng
        which = rng.randrange(3)
        if which == 0:
            return {"prompt": " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))}
        if which == 1:
            roles = rng.choice((["user"], ["system", "user"], ["user", "assistant", "user"]))
            return {
                "messages": [
                    {"role": r, "content": " ".join(rng.choices(WORDS, k=rng.randint(0, 5)))}
                    for r in roles
                ]
            }
        return {"prompt_token_ids": [rng.randrange(self.vocab) for _ in range(rng.randint(1, 20))]}

    def params(self) -> dict[str, Any]:
        """In-range sampling parameters, edges included; max_tokens small."""
        rng = self.rng
        max_tokens = rng.randint(1, 4)
        optional: dict[str, Callable[[], Any]] = {
            "min_tokens": lambda: rng.randint(0, max_tokens),
            "temperature": lambda: rng.choice((0, 0.0, 0.7, 1, 100)),
            "top_p": lambda: rng.choice((0.1, 0.9, 1)),
            "top_k": lambda: rng.choice((-1, 0, 1, 40, U64_MAX)),
            "min_p": lambda: rng.choice((0, 0.05, 1)),
            "repetition_penalty": lambda: rng.choice((0.5, 1.1, 10)),
            "presence_penalty": lambda: rng.uniform(-2, 2),
            "frequency_penalty": lambda: rng.uniform(-2, 2),
            "seed": lambda: rng.choice((None, 0, (1 << 63) - 1)),
            "stop": lambda: rng.choice(("\n", ["the", "fox"], ["x"] * MAX_STOP_STRINGS)),
            "stop_token_ids": lambda: [rng.randrange(self.vocab) for _ in range(rng.randint(0, 5))],
            "ignore_eos": lambda: rng.random() < 0.5,
            "logprobs": lambda: rng.choice((None, 0, 3, 20)),
            "skip_special_tokens": lambda: rng.random() < 0.5,
            "include_stop_str_in_output": lambda: rng.random() < 0.5,
            "special_tokens_in_content": lambda: rng.random() < 0.5,
        }
        params: dict[str, Any] = {"max_tokens": max_tokens}
        for name in rng.sample(sorted(optional), rng.randint(0, 6)):
            params[name] = optional[name]()
        return params

    def valid_map(self, kind: str, *, to: str | None = None, **changes: Any) -> dict[Any, Any]:
        """v, id, reply_to (`to`, else a legal one drawn) first, as encode_job writes them,
        then a prompt and options.

        changes: fields to set (DROP: to remove) after that; a prompt kind among them
        replaces the drawn one.
        """
        rng = self.rng
        raw: dict[Any, Any] = {"v": 1, "id": self.new_id(kind)}
        raw["reply_to"] = to if to is not None else rng.choice(LEGAL)
        raw.update(self.prompt_kind())
        if rng.random() < 0.8:
            raw["params"] = self.params()
        if rng.random() < 0.3:
            raw["stream"] = rng.random() < 0.5
        if rng.random() < 0.2:
            raw["deadline"] = rng.choice((int(time.time() * 1000) + 3_600_000, U64_MAX))
        if rng.random() < 0.2:
            raw["priority"] = rng.choice((-(1 << 63), -1, 0, 5, U64_MAX))
        if any(k in PROMPT_FIELDS for k in changes):
            for k in PROMPT_FIELDS:
                raw.pop(k, None)
        for name, value in changes.items():
            if value is DROP:
                raw.pop(name, None)
            else:
                raw[name] = value
        return raw

    @staticmethod
    def case(
        kind: str,
        raw: dict[Any, Any] | bytes,
        outcome: str,
        code: str | tuple[str, ...] | None = None,
        *,
        job_id: Any = SAME,
        reply_to: Any = SAME,
    ) -> Case:
        """A Case with field `job` = raw (a map is packed); job_id and reply_to are the map's
        own unless given (None: answered under the entry id / nobody to answer)."""
        if isinstance(raw, dict):
            job_id = raw.get("id") if job_id is SAME else job_id
            reply_to = raw.get("reply_to") if reply_to is SAME else reply_to
            raw = pack(raw)
        job_id, reply_to = (None if v is SAME else v for v in (job_id, reply_to))
        codes = (code,) if isinstance(code, str) else code or ()
        return Case(kind, {JOB_FIELD: raw}, outcome, job_id, reply_to, codes)

    def valid(self, keep_id: bool = False) -> Case:
        raw = self.valid_map("valid")
        if not keep_id and self.rng.random() < 0.2:
            del raw["id"]  # the worker answers under the entry id
        return self.case("valid", raw, OK)

    def extreme(self) -> Case:
        """Valid at the edges of every range; runs to the end of the context (max_tokens)."""
        big = {"max_tokens": U64_MAX, "min_tokens": U64_MAX, "top_k": U64_MAX}
        raw = self.valid_map("extreme", deadline=U64_MAX, priority=-(1 << 63))
        raw["params"] = {**big, "seed": (1 << 63) - 1, "logprobs": 20}
        return self.case("extreme", raw, OK)

    # -- drawn adversarial entries -----------------------------------------------------

    def random_bytes(self) -> Case:
        data = self.rng.randbytes(self.rng.randint(0, 64))
        return self.case("random-bytes", data, DEAD)

    def truncated(self) -> Case:
        raw = self.valid_map("truncated")
        # Both maps have a one-byte header: past `head` bytes, id and reply_to are whole.
        head = len(pack({k: raw[k] for k in ("v", "id", "reply_to")}))
        payload = pack(raw)
        cut = self.rng.randrange(1, len(payload))
        if cut < head:
            return self.case("truncated", payload[:cut], DEAD)
        ids = {"job_id": raw["id"], "reply_to": raw["reply_to"]}
        return self.case("truncated", payload[:cut], ANSWER, "invalid_request", **ids)

    def trailing_bytes(self) -> Case:
        raw = self.valid_map("trailing")
        data = pack(raw) + self.rng.randbytes(self.rng.randint(1, 8))
        ids = {"job_id": raw["id"], "reply_to": raw["reply_to"]}
        return self.case("trailing", data, ANSWER, "invalid_request", **ids)

    # -- one entry per wrong value -----------------------------------------------------

    def wrong_types(self) -> Iterator[Case]:
        for name, values in WRONG_TYPES.items():
            for value in values:
                raw = self.valid_map(f"type-{name}", **{name: value})
                if name == "id":  # answered under the entry id
                    yield self.case("type-id", raw, ANSWER, "invalid_request", job_id=None)
                elif name == "reply_to":
                    yield self.case("type-reply_to", raw, DEAD, "invalid_request", reply_to=None)
                else:
                    code = "invalid_params" if name == "params" else "invalid_request"
                    yield self.case(f"type-{name}", raw, ANSWER, code)

    def bad_params(self) -> Iterator[Case]:
        for name, values in bad_params(self.vocab).items():
            for value in values:
                raw = self.valid_map(f"param-{name}", params={"max_tokens": 2, name: value})
                yield self.case(f"param-{name}", raw, ANSWER, "invalid_params")

    def bad_token_ids(self) -> Iterator[Case]:
        for bad in (self.vocab, self.vocab + 1, 1 << 31, U64_MAX, -1, -(1 << 63)):
            ids = [self.rng.randrange(self.vocab) for _ in range(self.rng.randint(0, 5))]
            ids.insert(self.rng.randint(0, len(ids)), bad)
            raw = self.valid_map("token-ids", prompt_token_ids=ids)
            yield self.case("token-ids", raw, ANSWER, "invalid_request")

    def oversized(self) -> Iterator[Case]:
        """Over the payload cap, the context, or a documented limit of a field."""
        tokens = [self.rng.randrange(self.vocab) for _ in range(MAX_MODEL_LEN)]
        chat = [{"role": "user", "content": "hello there"}] * 400
        stop_ids = [1] * (MAX_STOP_TOKEN_IDS + 1)
        for changes, code, answer_id in (
            ({"prompt": "x" * (4 * MAX_PAYLOAD)}, "payload_too_large", SAME),
            ({"prompt": "hello " * (MAX_MODEL_LEN + 10)}, "prompt_too_long", SAME),
            ({"prompt_token_ids": tokens}, "prompt_too_long", SAME),
            ({"messages": chat}, "prompt_too_long", SAME),
            ({"id": "i" * (MAX_ID_CHARS + 1)}, "invalid_request", None),
            ({"params": {"stop": ["s"] * (MAX_STOP_STRINGS + 1)}}, "invalid_params", SAME),
            ({"params": {"stop": ["s" * (MAX_STOP_CHARS + 1)]}}, "invalid_params", SAME),
            ({"params": {"stop_token_ids": stop_ids}}, "invalid_params", SAME),
        ):  # fmt: skip
            yield self.case("big", self.valid_map("big", **changes), ANSWER, code, job_id=answer_id)

    def bad_reply_tos(self) -> Iterator[list[Case]]:
        """Each forbidden reply_to on a valid job, one with bad params and one over the cap,
        each followed by a victim: a valid job whose cancel mark or result key a write to
        the reply_to named would set (cancelling it or passing it off as done)."""
        over_cap = {"stop": ["s"] * (2 * MAX_PAYLOAD)}
        for target in (*FORBIDDEN, "result", "cancelled"):
            for params, code in (
                (None, "invalid_request"),
                # docs/protocol.md: the code of another defect, if it has one
                ({"temperature": -1}, ("invalid_request", "invalid_params")),
                (over_cap, ("invalid_request", "payload_too_large")),
            ):
                victim = self.valid(keep_id=True)
                name = {"result": KEYS.result, "cancelled": KEYS.cancelled}.get(target)
                reply_to = name(str(victim.job_id)) if name else target
                raw = self.valid_map("reply_to", to=reply_to, params=params or DROP)
                yield [self.case("reply_to", raw, DEAD, code, reply_to=None), victim]

    def missing_fields(self) -> Iterator[Case]:
        yield self.case("missing-v", self.valid_map("missing", v=DROP), ANSWER, "invalid_request")
        raw = self.valid_map("missing", reply_to=DROP)
        yield self.case("missing-reply_to", raw, DEAD, "invalid_request", reply_to=None)
        drop = dict.fromkeys(PROMPT_FIELDS, DROP)
        yield self.case(
            "missing-prompt", self.valid_map("missing", **drop), ANSWER, "invalid_request"
        )
        both = {"prompt": "Hi", "prompt_token_ids": [1]}
        yield self.case("two-prompts", self.valid_map("missing", **both), ANSWER, "invalid_request")

    def extra_fields(self) -> Iterator[Case]:
        for key in ("colour", "ID", "Reply_To", "", b"reply_to", 7):  # bin and int keys too
            raw = self.valid_map("extra")
            raw[key] = 1
            yield self.case("extra", raw, ANSWER, "invalid_request")
        raw = self.valid_map("extra", params={"max_tokens": 2, "beam_width": 4})
        yield self.case("extra-param", raw, ANSWER, "invalid_params")
        raw = self.valid_map("extra", messages=[{"role": "user", "content": "Hi", "name": "eve"}])
        yield self.case("extra-message-key", raw, ANSWER, "invalid_request")

    def bad_messages(self) -> Iterator[Case]:
        for messages in BAD_MESSAGES:
            raw = self.valid_map("messages", messages=messages)
            yield self.case("messages", raw, ANSWER, "invalid_request")
        for kind, empty in (("prompt", ""), ("messages", []), ("prompt_token_ids", [])):
            yield self.case(
                "empty", self.valid_map("empty", **{kind: empty}), ANSWER, "empty_prompt"
            )

    def invalid_utf8(self) -> Iterator[Case]:
        """A str (not bin) holding bytes that are not UTF-8, in each string field in turn."""
        hole = "\ue000hole\ue001"  # packed, then replaced by the bad string
        for where in ("id", "reply_to", "prompt", "content"):
            for bad in (b"\xff\xfe", b"\xed\xa0\x80", b"ok\xc3"):
                if where == "content":
                    raw = self.valid_map("utf8", messages=[{"role": "user", "content": hole}])
                else:
                    raw = self.valid_map("utf8", **{where: hole})
                data = pack(raw).replace(pack(hole), bytes([0xA0 | len(bad)]) + bad)  # fixstr
                if where == "reply_to":
                    yield self.case("utf8-reply_to", data, DEAD, "invalid_utf8")
                else:
                    answer_id = None if where == "id" else raw["id"]  # a bad id: the entry id
                    ids = {"job_id": answer_id, "reply_to": raw["reply_to"]}
                    yield self.case(f"utf8-{where}", data, ANSWER, "invalid_utf8", **ids)

    def hostile_msgpack(self) -> Iterator[Case]:
        """A prompt of deep nesting, a length past the end, or an ext type after id/reply_to."""
        for tail in (
            b"\x91" * 10_000 + b"\x01",  # 10,000 nested lists: past msgpack's depth limit
            b"\xdb\xff\xff\xff\xff" + b"x" * 8,  # str32 claiming 4 GiB
            b"\xdd\x7f\xff\xff\xff\x01",  # array32 claiming 2**31-1 items
            b"\xdf\xff\xff\xff\xff\xa1a\x01",  # map32 claiming 2**32-1 pairs
            pack(EXT),
        ):
            job_id, reply_to = self.new_id("hostile"), self.rng.choice(LEGAL)
            # The prompt's value ("x", two bytes) left off: the tail stands in for it.
            head = pack({"v": 1, "id": job_id, "reply_to": reply_to, "prompt": "x"})[:-2]
            ids = {"job_id": job_id, "reply_to": reply_to}
            yield self.case("hostile", head + tail, ANSWER, "invalid_request", **ids)

    def expired(self) -> Iterator[Case]:
        for deadline in (0, 7, int(time.time() * 1000) - 1000):
            raw = self.valid_map("expired", deadline=deadline)
            yield self.case("expired", raw, ANSWER, "deadline_exceeded")

    def odd_stream_entries(self) -> Iterator[Case]:
        """Stream entries that do not carry one non-empty `job` field."""
        payload = pack(self.valid_map("entry"))
        for name, value in (("Job", payload), ("job ", payload), ("payload", payload),
                            ("", b""), (JOB_FIELD, b"")):  # fmt: skip
            yield Case("entry-fields", {name: value}, DEAD, None, None, ("invalid_request",))

    def cases(self, drawn: int) -> list[Case]:
        """Every systematic entry, `drawn` random ones, and about 40% as many valid jobs."""
        groups: list[list[Case]] = [
            [case]
            for make in (
                self.wrong_types, self.bad_params, self.bad_token_ids, self.oversized,
                self.missing_fields, self.extra_fields, self.bad_messages, self.invalid_utf8,
                self.hostile_msgpack, self.expired, self.odd_stream_entries,
            )
            for case in make()
        ]  # fmt: skip
        groups += self.bad_reply_tos()
        groups.append(
            [self.case("string-key", self.valid_map("string-key", to=NOT_A_STREAM), STORED)]
        )
        draws = (self.random_bytes, self.truncated, self.trailing_bytes)
        groups += [[self.rng.choice(draws)()] for _ in range(drawn)]
        groups += [[self.valid()] for _ in range(len(groups) * 2 // 5)]
        groups.append([self.extreme()])
        self.rng.shuffle(groups)
        return [case for group in groups for case in group]


# Field → values of the wrong type (or a nil where one is required).
WRONG_TYPES: dict[str, list[Any]] = {
    "v": [None, True, 1.0, "1", b"\x01", [1], {"v": 1}, 2, -(1 << 63), U64_MAX, EXT],
    "id": [None, 7, 1.5, True, b"id", ["id"], {"id": "x"}, "", EXT],
    "reply_to": [None, 7, True, b"fuzz:replies", ["fuzz:replies"], {"a": "b"}, EXT],
    "prompt": [None, 7, 1.5, False, b"Hi", ["Hi"], {"text": "Hi"}, EXT],
    "messages": [7, "Hi", b"Hi", {"role": "user", "content": "Hi"}, True, EXT],
    "prompt_token_ids": [7, "1 2", b"\x01\x02", [1.0], ["1"], [True], [[1]], {"0": 1}, EXT],
    "params": [7, "max_tokens=2", b"", [["max_tokens", 2]], True, 1.5, EXT],
    "stream": [1, 0, "true", b"\x01", [True], {"a": True}, 1.0, EXT],
    "deadline": [-1, 1.5e12, "1700000000000", True, [1], {"ms": 1}, -(1 << 63), EXT],
    "priority": [1.5, "1", True, [1], {"p": 1}, b"\x01", EXT],
}
BAD_MESSAGES: list[Any] = [
    [{"role": "wizard", "content": "Hi"}],
    [{"role": 1, "content": "Hi"}],
    [{"role": "user", "content": 1}],
    [{"role": "user", "content": None}],
    [{"role": "user", "content": b"Hi"}],
    [{"role": "user"}],
    [{"content": "Hi"}],
    ["Hi"],
    [[{"role": "user", "content": "Hi"}]],
    [{"role": "user", "content": "Hi"}, 5],
    [EXT],
]


def bad_params(vocab: int) -> dict[str, list[Any]]:
    """Parameter → wrong-typed or out-of-range values (documented: invalid_params)."""
    nan, inf = math.nan, math.inf
    ints = ["1", 1.5, True, None, [1], EXT]
    floats = ["1", True, None, nan, inf, -inf, [1.0], EXT]
    bools = [1, 0, "true", None, 1.0, EXT]
    id_lists = [5, "1", [1.5], [True], ["1"], [[1]], EXT]
    return {
        "max_tokens": [0, -1, -(1 << 63), *ints],
        "min_tokens": [-1, 3, U64_MAX, *ints],  # max_tokens is 2
        "temperature": [-0.1, 100.5, 1e308, *floats],
        "top_p": [0, -1, 1.5, *floats],
        "top_k": [-2, -(1 << 63), *ints],
        "min_p": [-0.1, 1.1, *floats],
        "repetition_penalty": [0, 10.5, -1, *floats],
        "presence_penalty": [-2.5, 3, *floats],
        "frequency_penalty": [2.5, -3, *floats],
        "seed": [-1, 1 << 63, U64_MAX, "1", 1.5, True, [1], EXT],
        "stop": [[""], "", 1, [1], [None], [b"x"], b"x", {"s": "x"}, [["x"]], EXT],
        "stop_token_ids": [[-1], [U64_MAX], [vocab], [1 << 63], [-(1 << 63)], *id_lists],
        "ignore_eos": bools,
        "logprobs": [-1, 21, U64_MAX, "1", 1.5, True, [1], EXT],
        "skip_special_tokens": bools,
        "include_stop_str_in_output": bools,
        "special_tokens_in_content": bools,
    }


@contextmanager
def keyspace_events(client: redis.Redis) -> Iterator[list[tuple[str, str]]]:
    """(key, event) of every write to db 0 while inside, in order (keyspace notifications)."""
    prefix, sentinel = "__keyspace@0__:", "fuzz:sentinel"
    seen: list[tuple[str, str]] = []

    def record(message: dict[str, Any]) -> None:
        key = message["channel"].decode(errors="replace")[len(prefix) :]
        seen.append((key, message["data"].decode()))

    client.config_set("notify-keyspace-events", "KA")
    pubsub = client.pubsub()
    pubsub.psubscribe(**{f"{prefix}*": record})
    thread = pubsub.run_in_thread(sleep_time=0.01, daemon=True)
    try:
        # Writes from here on are seen: the subscription is live once its own event arrives.
        client.set(NOT_A_STREAM, b"precious")
        wait_for(lambda: (NOT_A_STREAM, "set") in seen, 10, "keyspace events")
        yield seen
        client.set(sentinel, 1)  # every earlier event has arrived once this one has
        wait_for(lambda: (sentinel, "set") in seen, 10, "the last keyspace events")
        seen.remove((sentinel, "set"))
    finally:
        thread.stop()
        thread.join(10)
        pubsub.close()
        client.config_set("notify-keyspace-events", "")
        client.delete(sentinel)


def final_results(client: redis.Redis) -> dict[str, list[tuple[str, Result]]]:
    """Final results on every legal reply stream: job id → [(stream, result)]."""
    out: dict[str, list[tuple[str, Result]]] = {}
    for stream in LEGAL:
        for job_id, results in finals(client, stream).items():
            out.setdefault(job_id, []).extend((stream, r) for r in results)
    return out


# Writes each key of the namespace may see (keyspace event names), by key pattern.
OWN_WRITES = (
    (
        "|".join(re.escape(stream) for stream in KEYS.request_streams),  # every priority level
        {"xadd", "xdel", "xgroup-create", "xgroup-createconsumer", "xclaim", "xautoclaim"},
    ),
    (re.escape(KEYS.dead_letter), {"xadd"}),
    (re.escape(KEYS.result("")) + ".*", {"set", "expire"}),
    (re.escape(KEYS.workers), {"hset", "hdel", "del"}),
    (re.escape(KEYS.worker("")) + ".*", {"set", "expire", "del"}),
    (re.escape(KEYS.layout), {"set"}),  # the shard count, written once (worker/layout.py)
)


def check_writes(events: list[tuple[str, str]], pushed: int, dead: int) -> None:
    """Every write went to a legal reply stream or to a key of the namespace in its own way;
    the requests stream got exactly our XADDs and the dead-letter stream one per dead entry."""
    counts = Counter(events)
    assert counts[(KEYS.requests, "xadd")] == pushed
    assert counts[(KEYS.dead_letter, "xadd")] == dead
    legal_streams = set(LEGAL)
    for key, event in counts:
        if key in legal_streams:
            assert event in {"xadd", "expire"}, (key, event)
        elif key == NOT_A_STREAM:
            assert event == "set", (key, event)  # written once, by the test
        else:
            allowed = any(re.fullmatch(p, key) and event in ev for p, ev in OWN_WRITES)
            assert allowed, f"unexpected write: {event} {key!r}"


def check_keys(client: redis.Redis, consumer: str) -> None:
    """Only documented keys exist, of their documented types; no reply stream at a bad name."""
    types = {key.decode(): client.type(key) for key in client.scan_iter(count=1000)}
    for key, kind in types.items():
        if key in (*KEYS.request_streams, KEYS.dead_letter, *LEGAL):
            assert kind == b"stream", (key, kind)
        elif key == NOT_A_STREAM:
            assert (kind, client.get(key)) == (b"string", b"precious")
        elif key.startswith(KEYS.result("")):
            assert kind == b"string" and client.ttl(key) > 0, (key, kind)
            assert decode_result(client.get(key)).id == key[len(KEYS.result("")) :]
        elif key == KEYS.workers:
            assert kind == b"hash"
        elif key == KEYS.worker(consumer):
            assert kind == b"string"
        elif key == KEYS.layout:
            assert (kind, client.get(key)) == (b"string", KEYS.layout_value.encode())
        else:
            raise AssertionError(f"unexpected key {key!r} ({kind!r})")


@pytest.mark.parametrize("seed", [12, 2024])
def test_fuzzed_entries_never_fail_valid_jobs_nor_write_into_own_keys(
    seed: int, engine, redis_url: str, client: redis.Redis
) -> None:
    codes = documented_codes()
    assert {"invalid_request", "invalid_params", "internal", "payload_too_large"} <= codes
    cases = Fuzzer(seed, engine.vocab_size).cases(DRAWN)
    # No reclaims: a slow (shared) machine must not turn a job into a second delivery here.
    config = worker_config(
        redis_url, engine.config, max_payload_bytes=MAX_PAYLOAD, claim_idle_ms=60_000
    )
    with keyspace_events(client) as events, InProcessWorker(config, engine) as worker:
        for start in range(0, len(cases), 50):  # in chunks, while the worker reads
            chunk = cases[start : start + 50]
            for case, entry_id in zip(chunk, push(client, [c.fields for c in chunk]), strict=True):
                case.entry_id = entry_id
        answered = [c for c in cases if c.outcome in (OK, ANSWER)]
        dead = [c for c in cases if c.outcome == DEAD]
        # Every entry is deleted with its final result, error or dead letter (and acked first).
        wait_for(
            lambda: client.xlen(KEYS.requests) == 0 and pending_count(client) == 0,
            120,
            "every entry answered or dead-lettered, and acked",
            poll=0.2,
        )
        got = final_results(client)

        # Exactly one final result per answerable entry, on the stream it named.
        assert set(got) == {c.answer_id for c in answered}
        for case in answered:
            assert len(got[case.answer_id]) == 1, (case, got[case.answer_id])
            [(stream, result)] = got[case.answer_id]
            assert stream == case.reply_to, case
            if case.outcome == OK:
                assert result.status == "ok", (case, result.error)
                if case.kind == "extreme":  # max_tokens 2**64-1: ends with the context
                    assert result.finish_reason == "length"
                    assert sum(result.usage.values()) == MAX_MODEL_LEN
            else:
                assert result.status == "error", (case, result)
                assert result.error_code in codes, (case, result.error)
                assert case.allows(result.error_code), (case, result.error)
        for case in (c for c in cases if c.outcome == STORED):
            assert decode_result(client.get(KEYS.result(case.answer_id))).status == "ok"

        # Unanswerable entries: one dead-letter entry each, with a documented code.
        stream = [f for _, f in client.xrange(KEYS.dead_letter)]
        assert not [f for f in stream if b"result" in f], "results written as dead letters"
        letters = {f[b"entry_id"].decode(): f for f in stream}
        assert len(stream) == len(letters) == len(dead)
        assert set(letters) == {c.entry_id for c in dead}
        for case in dead:
            letter = letters[case.entry_id]
            code = letter[b"code"].decode()
            assert code in codes and case.allows(code), (case, letter)
            payload = case.fields.get(JOB_FIELD, b"")
            assert int(letter[b"job_size"]) == len(payload)
            assert payload.startswith(letter[JOB_FIELD.encode()])

        # The worker is alive and serves another job.
        [last] = push(client, [pack({"v": 1, "reply_to": LEGAL[0], "prompt": "Hi"})])
        wait_for(lambda: last in finals(client, LEGAL[0]), 30, "a job after the fuzz")
        assert finals(client, LEGAL[0])[last][0].status == "ok"
        wait_for(lambda: pending_count(client) == 0, 10, "the last job acked")
        assert worker.stop() == 0
    check_writes(events, pushed=len(cases) + 1, dead=len(dead))
    check_keys(client, config.consumer)
