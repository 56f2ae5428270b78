"""The `headrace worker` verb: serve jobs from a Redis stream (flags + HEADRACE_* env)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any

from worker.logs import use_log_format
from worker.settings import WorkerConfig, add_arguments

log = logging.getLogger(__name__)

_GIL_SWITCH_S = 0.0005


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="serve generation jobs from a Redis stream",
        description=(
            "Read jobs from {namespace}:requests, run them in one continuous batch, publish "
            "results to each job's reply_to stream. Without --redis-url an embedded "
            "redis-server is started and its URL printed. SIGTERM/SIGINT drains and exits 0."
        ),
    )
    add_arguments(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    config = WorkerConfig.from_args(args)
    use_log_format(config.log_format)
    return run_worker(config)


def run_worker(config: WorkerConfig, engine: Any | None = None) -> int:
    """Run one worker until stopped (or, in burst mode, until the queue is empty)."""
    from worker.embedded import start_embedded_redis
    from worker.service import WorkerService

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
        # The engine thread gives up the GIL inside every torch op; a shorter switch
        # interval gets it back sooner from the event loop (measured ~5% of throughput
        # on fast steps). Process-wide, so only here where this process is the worker.
        sys.setswitchinterval(_GIL_SWITCH_S)
        return run_event_loop(WorkerService(config, engine).run())


def run_event_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where available (it is on Linux/macOS), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return asyncio.run(main)
    return uvloop.run(main)
