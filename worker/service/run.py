"""Process stage: one worker process — embedded Redis if asked, the engine on the main thread,
the asyncio service on a helper thread — until stopped (or, in burst mode, the queue runs dry).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from worker.service.settings import WorkerConfig

if TYPE_CHECKING:
    from worker.engine.engine import Engine
    from worker.service.worker import WorkerService

_GIL_SWITCH_S = 0.0005


def run_worker(config: WorkerConfig, engine: Engine | None = None) -> int:
    """Run one worker until stopped (or, in burst mode, until the queue is empty)."""
    from worker.embedded import start_embedded_redis
    from worker.service.worker import WorkerService

    with contextlib.ExitStack() as stack:
        if config.redis_url is None:
            server = start_embedded_redis()
            stack.callback(server.stop)
            print(
                f"embedded Redis at {server.url} — other processes can join with "
                f"--redis-url {server.url}",
                flush=True,
            )
            config = replace(config, redis_url=server.url)
        if engine is None:
            from worker.engine.engine import Engine

            # Loaded before the event loop starts so a bad model fails plainly and early.
            engine = Engine(config.engine)
            engine.warm_up()  # before the first heartbeat: jobs never wait for it
        # The engine thread gives up the GIL inside every torch op; a shorter switch
        # interval gets it back sooner from the event loop (measured ~5% of throughput
        # on fast steps). Process-wide, so only here where this process is the worker.
        sys.setswitchinterval(_GIL_SWITCH_S)
        host = MainThreadHost()
        return host.run(WorkerService(config, engine, engine_host=host))


class MainThreadHost:
    """Runs the engine loop on the main thread and the asyncio service on a helper thread.

    NOTE: on torch's OpenMP CPU build, a step issued from a non-main thread ran ~30%
    slower here (OpenMP fork/join from a non-initial thread: 120 vs 160-175 tok/s on
    32 mixed requests), so the thread that does the compute is the main one. Signals
    are delivered to the main thread and forwarded to the service (a second one skips
    the drain).
    """

    def __init__(self) -> None:
        self._work: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()

    def __call__(self, fn: Callable[[], None]) -> None:
        self._work.put(fn)

    def run(self, service: WorkerService) -> int:
        result: dict[str, int] = {}

        def serve_io() -> None:
            try:
                result["code"] = run_event_loop(service.run())
            finally:
                self._work.put(None)  # wakes the main thread when the service ends

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: service.request_stop())
        io_thread = threading.Thread(target=serve_io, name="headrace-io")
        io_thread.start()
        while (fn := self._work.get()) is not None:
            fn()  # the engine loop: returns once the service stops it
        io_thread.join()
        return result.get("code", 1)


def run_event_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where available (it is on Linux/macOS), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return asyncio.run(main)
    return uvloop.run(main)
