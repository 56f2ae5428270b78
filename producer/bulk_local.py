"""LocalStack (producer side of `headrace bulk` without a Redis URL): embedded Redis + one worker.

The worker is a `headrace worker` child process rather than a task in the bulk
process: it gets its own interpreter (no GIL shared with JSON parsing and output
writing), its own signal handling, and a model crash cannot take the output file
down with it. Both children die with the bulk process, even on SIGKILL (Linux
PR_SET_PDEATHSIG), so a killed run leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from worker.embedded import EmbeddedRedis, start_embedded_redis

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_POLL_S = 0.2
_STOP_TIMEOUT_S = 30.0


@dataclass
class LocalStack:
    """An embedded redis-server and a worker child serving it; `stop()` ends both."""

    redis: EmbeddedRedis
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return self.redis.url

    @classmethod
    def start(cls, namespace: str, worker_flags: tuple[str, ...]) -> LocalStack:
        """Start both; call from a long-lived thread (the children die with it).

        worker_flags: extra `headrace worker` flags (model, dtype, cache size...).
        """
        server = start_embedded_redis()
        fd, log_name = tempfile.mkstemp(prefix="headrace-bulk-worker-", suffix=".log")
        args = [
            sys.executable, "-m", "worker.cli", "worker",
            "--redis-url", server.url, "--namespace", namespace, *worker_flags,
        ]  # fmt: skip
        try:
            process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                # Own session: a terminal's Ctrl-C goes to the bulk process, which then
                # stops the worker itself (in order: worker, then its Redis).
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        except BaseException:
            server.stop()
            raise
        finally:
            os.close(fd)
        log.info("local worker (pid %d) on %s; its log: %s", process.pid, server.url, log_name)
        return cls(server, process, Path(log_name))

    async def wait_exit(self) -> int:
        """Return the worker's exit code once it exits (it should not before stop())."""
        while (code := self.process.poll()) is None:
            await asyncio.sleep(_POLL_S)
        return code

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
            return "\n".join(text) + f"\n(full log: {self.log_path})"
        return f"(no log at {self.log_path})"

    def stop(self, clean: bool = True, keep_log: bool = False) -> None:
        """clean: SIGTERM and let the (idle) worker exit; else kill it. Then stop Redis.

        keep_log: leave the worker's log file for a post-mortem (removed otherwise).
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM if clean else signal.SIGKILL)
            try:
                self.process.wait(_STOP_TIMEOUT_S if clean else 5.0)
            except subprocess.TimeoutExpired:
                log.warning("local worker did not stop in time; killing it")
                self.process.kill()
                self.process.wait()
        self.redis.stop()
        if keep_log:
            log.info("local worker log kept at %s", self.log_path)
        else:
            self.log_path.unlink(missing_ok=True)


def _die_with_parent() -> None:
    # The bulk process owns the worker's Redis: once it is gone the worker has nothing to do.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
