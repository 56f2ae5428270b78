"""`headrace bulk`: both formats end to end through the embedded default, resume after a kill,
error lines, and the OpenAI line mapping (tiny llama, float32, real Redis and worker)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from transformers import AutoTokenizer

from producer.bulk import BulkConfig, run_bulk
from producer.bulk_formats import CHAT_URL, OPENAI, SIMPLE, TEXT_URL, parse_line
from producer.lost_jobs import WatchConfig
from tests.worker_harness import (
    REPO_ROOT,
    InProcessWorker,
    engine_config,
    wait_for,
    worker_config,
)
from worker.cli import main
from worker.embedded import EmbeddedRedis, start_embedded_redis
from worker.engine.engine import Engine
from worker.keys import Keys

GREEDY = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Engine:
    """One engine per module (built once), for the in-process workers and the reference."""
    return Engine(engine_config(model_dir))


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture
def local_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded default path; the local worker's knobs come from HEADRACE_* (it
    inherits them), so the command line stays `bulk IN -o OUT --model DIR`."""
    monkeypatch.delenv("HEADRACE_REDIS_URL", raising=False)
    monkeypatch.delenv("HEADRACE_NAMESPACE", raising=False)
    for name, value in {"DTYPE": "float32", "NUM_THREADS": "1", "NUM_KV_BLOCKS": "512"}.items():
        monkeypatch.setenv(f"HEADRACE_{name}", value)


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def read_output(path: Path) -> list[dict[str, Any]]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n"), "output must end with a whole line"
    return [json.loads(line) for line in raw.decode().splitlines()]


def by_key(lines: list[dict[str, Any]], field: str) -> dict[str, dict[str, Any]]:
    counts = Counter(line[field] for line in lines)
    assert max(counts.values()) == 1, f"duplicate output lines: {counts.most_common(3)}"
    return {line[field]: line for line in lines}


def engine_tokens(engine: Engine, prompt_ids: list[list[int]]) -> list[list[int]]:
    """Greedy token ids of the same engine run in-process (what the worker must return)."""
    items = [{"prompt_token_ids": ids, "params": GREEDY} for ids in prompt_ids]
    return [list(c.token_ids) for c in engine.generate(items)]


@pytest.mark.slow
def test_simple_round_trip_with_error_lines(
    tmp_path: Path,
    model_dir: Path,
    tokenizer,
    local_env: None,
    capsys: pytest.CaptureFixture,
    engine: Engine,
) -> None:
    chat = [{"role": "user", "content": "Hi there"}]
    inp = write_lines(
        tmp_path / "in.jsonl",
        [
            {"id": "plain", "prompt": "Hello world", "params": GREEDY},
            {"id": 7, "messages": chat, **GREEDY},  # int id, params at top level
            {
                "custom_id": "tok",
                "prompt_token_ids": [1, 2, 3],
                "params": {**GREEDY, "logprobs": 2},
            },
            {"prompt": "no id", "params": {"max_tokens": 2}},
            "",
            '{"id": "broken", "prompt": ',
            {"id": "bad-param", "prompt": "x", "params": {"temperature": -1}},
            {"id": "empty", "prompt": ""},
            {"id": "plain", "prompt": "same id again"},
            {"id": "extra", "prompt": "x", "colour": "red"},
            {"id": "too-long", "prompt_token_ids": [5] * 2000},
        ],
    )
    out = tmp_path / "out.jsonl"
    assert main(["bulk", str(inp), "-o", str(out), "--model", str(model_dir)]) == 0

    lines = read_output(out)
    keys = Counter(line.get("custom_id", line.get("id")) for line in lines)
    expected = ["plain", "7", "tok", "line-4", "line-6", "bad-param", "empty", "extra", "too-long"]
    assert keys == Counter({**dict.fromkeys(expected, 1), "plain": 2})
    errors = {line.get("id"): line["error"]["code"] for line in lines if "error" in line}
    assert errors == {
        "line-6": "invalid_request",  # not JSON
        "bad-param": "invalid_params",
        "empty": "empty_prompt",  # answered by the worker
        "plain": "invalid_request",  # the duplicate; the first "plain" ran
        "extra": "invalid_request",
        "too-long": "prompt_too_long",
    }
    ok = {line.get("custom_id", line.get("id")): line for line in lines if "error" not in line}
    chat_ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    prompts = {"plain": tokenizer.encode("Hello world"), "7": list(chat_ids), "tok": [1, 2, 3]}
    want = dict(zip(prompts, engine_tokens(engine, list(prompts.values())), strict=True))
    for key, line in ok.items():
        assert line["text"] == tokenizer.decode(line["token_ids"], skip_special_tokens=True)
        assert line["usage"]["completion_tokens"] == len(line["token_ids"])
        if key in want:
            assert line["token_ids"] == want[key], key
            assert line["usage"]["prompt_tokens"] == len(prompts[key])
            assert line["finish_reason"] == "length"
    assert [lp["token_id"] for lp in ok["tok"]["logprobs"]] == ok["tok"]["token_ids"]
    assert all(len(lp["top"]) == 2 for lp in ok["tok"]["logprobs"])
    assert "tok" in ok and "custom_id" in ok["tok"] and "id" not in ok["tok"]  # mirrors input
    summary = capsys.readouterr().err
    assert re.search(r"bulk: 10 requests \(6 errors\)", summary), summary


def openai_line(custom_id: Any, url: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


@pytest.mark.slow
def test_openai_round_trip_schema_and_error_lines(
    tmp_path: Path, model_dir: Path, tokenizer, local_env: None
) -> None:
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    inp = write_lines(
        tmp_path / "batch.jsonl",
        [
            openai_line("chat", CHAT_URL, model="m1", messages=chat, **GREEDY),
            openai_line(
                "chat-lp",
                CHAT_URL,
                messages=chat,
                max_completion_tokens=3,
                logprobs=True,
                top_logprobs=2,
                temperature=0,
                user="u1",
                n=1,
            ),  # fmt: skip
            openai_line("text", TEXT_URL, model="m2", prompt="Once upon", **GREEDY, logprobs=1),
            openai_line("text-ids", TEXT_URL, prompt=[[1, 2, 3]], max_tokens=2, stop=None),
            openai_line("n2", CHAT_URL, messages=chat, n=2),
            openai_line("unknown", CHAT_URL, messages=chat, tools=[]),
            openai_line("embed", "/v1/embeddings", input="x"),
            openai_line("streamed", TEXT_URL, prompt="x", stream=True),
            {"method": "POST", "url": CHAT_URL, "body": {"messages": chat}},  # no custom_id
            "[1, 2]",
        ],
    )
    out = tmp_path / "out.jsonl"
    assert main(["bulk", str(inp), "-o", str(out), "--model", str(model_dir)]) == 0

    lines = by_key(read_output(out), "custom_id")
    assert set(lines) == {
        "chat", "chat-lp", "text", "text-ids", "n2", "unknown", "embed", "streamed",
        "line-9", "line-10",
    }  # fmt: skip
    for line in lines.values():
        assert set(line) == {"id", "custom_id", "response", "error"}
        assert set(line["response"]) == {"status_code", "request_id", "body"}
    for key in ("n2", "unknown", "embed", "streamed", "line-9", "line-10"):
        line = lines[key]
        assert line["response"]["status_code"] == 400, key
        assert line["response"]["body"]["error"]["type"] == "invalid_request_error"
        assert line["error"]["code"] == line["response"]["body"]["error"]["code"]
    assert "tools" in lines["unknown"]["error"]["message"]

    chat_ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    expect = {
        "chat": ("chat.completion", "m1", len(chat_ids), 6),
        "chat-lp": ("chat.completion", "headrace", len(chat_ids), 3),
        "text": ("text_completion", "m2", len(tokenizer.encode("Once upon")), 6),
        "text-ids": ("text_completion", "headrace", 3, 2),
    }
    for key, (obj, model, prompt_tokens, max_tokens) in expect.items():
        line = lines[key]
        assert line["error"] is None and line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert (body["object"], body["model"]) == (obj, model)
        assert isinstance(body["created"], int) and body["id"]
        usage = body["usage"]
        assert usage["prompt_tokens"] == prompt_tokens
        assert 1 <= usage["completion_tokens"] <= max_tokens
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        (choice,) = body["choices"]
        assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
        if obj == "chat.completion":
            assert choice["message"]["role"] == "assistant"
            assert isinstance(choice["message"]["content"], str)
        else:
            assert isinstance(choice["text"], str)
    content = lines["chat-lp"]["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert len(content) == lines["chat-lp"]["response"]["body"]["usage"]["completion_tokens"]
    assert all(len(t["top_logprobs"]) == 2 and t["token"].startswith("token_id:") for t in content)
    text_lp = lines["text"]["response"]["body"]["choices"][0]["logprobs"]
    assert len(text_lp["tokens"]) == len(text_lp["token_logprobs"]) == 6
    assert lines["chat"]["response"]["body"]["choices"][0]["logprobs"] is None


@pytest.mark.slow
def test_resume_after_kill_midway(tmp_path: Path, model_dir: Path, local_env: None) -> None:
    ids = [f"q{i:03d}" for i in range(60)]
    params = {"max_tokens": 24, "ignore_eos": True, "temperature": 0.0}
    inp = write_lines(
        tmp_path / "in.jsonl", [{"id": i, "prompt": i, "params": params} for i in ids]
    )
    out, log_path = tmp_path / "out.jsonl", tmp_path / "bulk.log"
    args = [sys.executable, "-m", "worker.cli", "bulk", str(inp), "-o", str(out)]
    args += ["--model", str(model_dir), "--window", "2", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TMPDIR=str(tmp_path))  # logs stay here
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=log_file)
    try:
        deadline = time.monotonic() + 90
        while not (out.exists() and out.read_bytes().count(b"\n") >= 5):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    worker_pid = int(re.search(r"local worker \(pid (\d+)\)", log_path.read_text())[1])
    _wait_gone(worker_pid)  # died with its parent, no orphan left running

    before = out.read_bytes()
    done_before = {json.loads(line)["id"] for line in before.decode().splitlines()}
    assert 5 <= len(done_before) < len(ids), "the kill must land midway"
    with open(out, "ab") as f:  # a line torn by a crash in the middle of a write
        f.write(b'{"id": "q999", "text": "half a li')

    assert main(["bulk", str(inp), "-o", str(out), "--model", str(model_dir)]) == 0
    after = out.read_bytes()
    assert after.startswith(before), "lines written before the kill are kept as they were"
    lines = by_key(read_output(out), "id")
    assert sorted(lines) == ids
    assert all(line["usage"]["completion_tokens"] == 24 for line in lines.values())

    # Everything done: a third run writes nothing and needs no worker.
    started = time.monotonic()
    assert main(["bulk", str(inp), "-o", str(out), "--model", str(model_dir)]) == 0
    assert out.read_bytes() == after
    assert time.monotonic() - started < 5


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":
            return
        time.sleep(0.05)
    raise AssertionError(f"local worker {pid} still running after its bulk process was killed")


@pytest.mark.slow
def test_local_worker_failure_ends_the_run(tmp_path: Path, local_env: None) -> None:
    """A worker that cannot start fails the run with its log, instead of waiting forever."""
    inp = write_lines(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}])
    args = [sys.executable, "-m", "worker.cli", "bulk", str(inp), "-o", str(tmp_path / "o.jsonl")]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TMPDIR=str(tmp_path))  # logs stay here
    done = subprocess.run(
        [*args, "--model", str(tmp_path / "no-such-model"), "--no-progress"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "local worker exited with code 1" in done.stderr
    assert "model directory not found" in done.stderr


def test_external_redis_and_worker(
    tmp_path: Path, model_dir: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch, engine: Engine
) -> None:
    """With --redis-url the run uses the workers already serving the namespace."""
    monkeypatch.delenv("HEADRACE_REDIS_URL", raising=False)
    prompt_ids = [[1, 2, 3, 4], [10, 11], [7] * 40]
    want = engine_tokens(engine, prompt_ids)
    inp = write_lines(
        tmp_path / "in.jsonl",
        [{"id": f"r{i}", "prompt_token_ids": ids} for i, ids in enumerate(prompt_ids)],
    )
    out = tmp_path / "out.jsonl"
    with InProcessWorker(worker_config(redis_url, engine.config), engine) as worker:
        args = ["bulk", str(inp), "-o", str(out), "--redis-url", redis_url, "--window", "2"]
        args += ["--lost-after", "5"]
        assert main([*args, "--max-tokens", "6", "--temperature", "0", "--no-progress"]) == 0
        assert worker.service.stats()["published"] == len(prompt_ids)
    lines = by_key(read_output(out), "id")
    assert [lines[f"r{i}"]["token_ids"] for i in range(len(prompt_ids))] == want


def test_priority_flag_routes_lines_without_one_to_their_level(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch, engine: Engine
) -> None:
    """`--priority -1`: OpenAI lines (which have no priority field) go to the low stream."""
    monkeypatch.delenv("HEADRACE_REDIS_URL", raising=False)
    body = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0}
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": TEXT_URL, "body": body} for i in range(3)
    ]
    inp = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    keys = Keys("headrace")
    with InProcessWorker(worker_config(redis_url, engine.config), engine):
        args = ["bulk", str(inp), "-o", str(out), "--redis-url", redis_url, "--priority", "-1"]
        assert main([*args, "--no-progress"]) == 0
    assert sorted(line["custom_id"] for line in read_output(out)) == ["c0", "c1", "c2"]
    client = redis.Redis.from_url(redis_url)
    added = {
        s: client.xinfo_stream(s)["entries-added"] for s in keys.request_streams if client.exists(s)
    }
    assert added.get(keys.request_stream(-1)) == 3
    assert added.get(keys.requests, 0) == 0 and added.get(keys.request_stream(1), 0) == 0


# -- Redis losing its data mid-run ------------------------------------------------------------

LOSSY = {"max_tokens": 16, "ignore_eos": True, "temperature": 0.0}
QUICK_WATCH = WatchConfig(check_s=0.2, lost_after_s=1.0, redis_down_s=60.0)


def lossy_run(tmp_path: Path, redis_url: str, n: int) -> tuple[list[str], BulkConfig]:
    ids = [f"q{i:02d}" for i in range(n)]
    inp = write_lines(tmp_path / "in.jsonl", [{"id": i, "prompt": i, "params": LOSSY} for i in ids])
    config = BulkConfig(
        inp,
        tmp_path / "out.jsonl",
        redis_url=redis_url,
        window=8,
        progress=False,
        watch=QUICK_WATCH,
    )
    return ids, config


def lines_written(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def in_background(action) -> threading.Thread:
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    return thread


def assert_every_line_once(config: BulkConfig, ids: list[str], summary) -> None:
    lines = by_key(read_output(config.output_path), "id")
    assert sorted(lines) == ids
    assert all(line["usage"]["completion_tokens"] == 16 for line in lines.values()), lines
    assert summary.requests == len(ids) and summary.errors == 0
    assert summary.resubmitted >= 1, "the test must lose jobs"


def test_flushall_midway_every_line_answered_once(
    tmp_path: Path, model_dir: Path, redis_url: str, engine: Engine
) -> None:
    """FLUSHALL while jobs wait in the stream: the bulk notices them missing and resubmits."""
    ids, config = lossy_run(tmp_path, redis_url, 32)
    # max_inflight 2: most of the window waits in the stream, where the flush drops it.
    cfg = worker_config(redis_url, engine.config, max_inflight=2)
    with InProcessWorker(cfg, engine):

        def flush_midway() -> None:
            wait_for(lambda: lines_written(config.output_path) >= 4, 120, "4 lines")
            redis.Redis.from_url(redis_url).flushall()

        flusher = in_background(flush_midway)
        summary = asyncio.run(run_bulk(config))
        flusher.join(5)
    assert_every_line_once(config, ids, summary)


def test_redis_restart_without_persistence_midway_every_line_answered_once(
    tmp_path: Path, model_dir: Path, engine: Engine
) -> None:
    """A restart (new run_id, connections dropped, data gone): lost jobs resubmitted at once."""
    server = start_embedded_redis()
    port = server.port
    ids, config = lossy_run(tmp_path, server.url, 32)
    cfg = worker_config(server.url, engine.config, max_inflight=2)
    restarted: list[EmbeddedRedis] = []
    try:
        with InProcessWorker(cfg, engine):

            def restart_midway() -> None:
                wait_for(lambda: lines_written(config.output_path) >= 4, 120, "4 lines")
                server.stop()
                # Not tied to this short-lived thread (PDEATHSIG); stopped below.
                restarted.append(start_embedded_redis(port=port, die_with_parent=False))

            restarter = in_background(restart_midway)
            summary = asyncio.run(run_bulk(config))
            restarter.join(5)
    finally:
        for each in (server, *restarted):
            each.stop()
    assert restarted, "the server must have restarted midway"
    assert_every_line_once(config, ids, summary)


# -- line mapping (no model) ---------------------------------------------------------------


def parse(fmt: str, obj: Any, defaults: dict[str, Any] | None = None):
    return parse_line(fmt, json.dumps(obj).encode(), 1, defaults or {})


def test_openai_body_maps_to_sampling_params() -> None:
    chat = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    item = parse(
        OPENAI,
        openai_line(
            "x",
            CHAT_URL,
            model="gpt",
            messages=chat,
            max_tokens=9,
            max_completion_tokens=5,
            temperature=0.5,
            top_p=0.9,
            stop="\n",
            seed=3,
            presence_penalty=0.1,
            frequency_penalty=0.2,
            logprobs=True,
            top_logprobs=4,
            top_k=7,
        ),  # fmt: skip
        defaults={"max_tokens": 50, "temperature": 1.0},
    )
    assert item.error is None and (item.key, item.url, item.model) == ("x", CHAT_URL, "gpt")
    assert item.job == {
        "messages": [{"role": "user", "content": "ab"}],
        "params": {
            "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "stop": "\n", "seed": 3,
            "presence_penalty": 0.1, "frequency_penalty": 0.2, "logprobs": 4, "top_k": 7,
        },
    }  # fmt: skip
    text = parse(OPENAI, openai_line("t", TEXT_URL, prompt=["only one"], logprobs=0))
    assert text.job == {"prompt": "only one", "params": {"logprobs": 0}}


@pytest.mark.parametrize(
    ("obj", "code", "fragment"),
    [
        (openai_line("x", CHAT_URL, messages=[], top_logprobs=2), "invalid_params", "logprobs"),
        (openai_line("x", TEXT_URL, prompt=["a", "b"]), "invalid_request", "one prompt"),
        (openai_line("x", TEXT_URL, prompt="a", best_of=3), "invalid_request", "best_of"),
        (openai_line("x", TEXT_URL, prompt="a", temperature=9e9), "invalid_params", "temperature"),
        ({**openai_line("x", TEXT_URL, prompt="a"), "method": "GET"}, "invalid_request", "POST"),
        ({**openai_line("x", TEXT_URL, prompt="a"), "extra": 1}, "invalid_request", "extra"),
    ],
)
def test_openai_bad_lines(obj: dict[str, Any], code: str, fragment: str) -> None:
    item = parse(OPENAI, obj)
    assert item.job is None and item.key == "x"
    assert item.error.code == code and fragment in item.error.message


def test_simple_params_merge_and_conflicts() -> None:
    item = parse(
        SIMPLE, {"id": "a", "prompt": "p", "top_k": 3, "params": {"seed": 1}}, {"top_p": 0.5}
    )
    assert item.job == {"prompt": "p", "params": {"top_p": 0.5, "seed": 1, "top_k": 3}}
    both = parse(SIMPLE, {"id": "a", "prompt": "p", "seed": 2, "params": {"seed": 1}})
    assert both.error.code == "invalid_params" and "seed" in both.error.message
    two = parse(SIMPLE, {"prompt": "p", "messages": []})
    assert (two.key, two.error.code) == ("line-1", "invalid_request")


def test_simple_lines_carry_a_priority() -> None:
    assert parse(SIMPLE, {"prompt": "p", "priority": 2}).job == {
        "prompt": "p",
        "params": {},
        "priority": 2,
    }
    assert "priority" not in parse(SIMPLE, {"prompt": "p"}).job
    bad = parse(SIMPLE, {"prompt": "p", "priority": "high"})
    assert bad.error.code == "invalid_request" and "priority" in bad.error.message
