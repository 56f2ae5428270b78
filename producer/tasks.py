"""Task shutdown for the producer side: cancel background loops until they have really ended.

One `task.cancel()` does not always end a task on Python < 3.12: `asyncio.wait_for`, which
redis-py wraps around socket writes and reads, returns its inner call's result instead of
raising when the cancel lands just as that call completes (CPython gh-86296, fixed in 3.12
by building wait_for on asyncio.timeout). A loop that lost its cancel that way runs on, and
whoever awaits it waits forever (seen: `headrace bulk` hanging at exit after a FLUSHALL).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

_RETRY_S = 0.2


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any] | None]) -> None:
    """Cancel every task and wait until all have ended, cancelling again those that ran on.
    Their results and errors are discarded (the caller stops them because it is done)."""
    stopping = [task for task in tasks if task is not None]
    pending = set(stopping)
    while pending:
        for task in pending:
            task.cancel()
        _done, pending = await asyncio.wait(pending, timeout=_RETRY_S)
    for task in stopping:
        if not task.cancelled():
            with contextlib.suppress(BaseException):
                task.exception()  # retrieved: no "exception was never retrieved" warning
