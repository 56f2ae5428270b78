"""Resilience (every worker stage): Redis calls that ride out outages, background tasks that never die silently.

`Retrier.call` runs one Redis operation until it succeeds: connection loss and
timeouts back off (exponential, jittered, capped) and retry; NOGROUP (Redis came
back empty, or a failover to a replica without the group) re-creates the consumer
group and retries. `Supervisor` owns the service's background tasks: one that raises,
or a loop that returns before shutdown, is logged with its traceback and reported, so
the service can stop loudly instead of running on without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import redis.exceptions
from redis.backoff import EqualJitterBackoff

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors after which the same call may succeed once Redis is reachable again.
# NoScriptError: a Redis that restarted empty between a pipeline's script load and its
# EVALSHA answers NOSCRIPT; the retry's pipeline loads the script again.
# ClusterDownError / TryAgainError: a cluster whose failed primary's slots are not served
# again yet (a failover under way), or a slot migrating; ReadOnlyError: a primary that was
# demoted to a replica (Sentinel failover) until the client finds the new one.
TRANSIENT: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.NoScriptError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,
    OSError,
)
_BASE_S = 0.05
_CAP_S = 2.0


class Interrupted(Exception):
    """A retried call gave up because its caller is stopping."""


def is_nogroup(exc: BaseException) -> bool:
    # A pipeline wraps the reply: "Command # 1 (XCLAIM ...) of pipeline caused error: NOGROUP ..."
    return isinstance(exc, redis.exceptions.ResponseError) and "NOGROUP " in str(exc)


class Backoff:
    """Delays between consecutive failures: exponential, capped, jittered (redis-py's
    equal jitter: half the delay fixed, half random, so retries of many workers spread out
    but none hammers Redis with near-zero delays)."""

    def __init__(self, base_s: float = _BASE_S, cap_s: float = _CAP_S) -> None:
        self._policy = EqualJitterBackoff(cap=cap_s, base=base_s)
        self.failures = 0

    def reset(self) -> None:
        self.failures = 0

    async def sleep(self, stop: asyncio.Event | None = None) -> bool:
        """Wait the next delay; True if `stop` was set meanwhile (or already)."""
        self.failures += 1
        delay = self._policy.compute(self.failures)
        if stop is None:
            await asyncio.sleep(delay)
            return False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        return stop.is_set()


class Retrier:
    """Runs Redis calls until they succeed.

    ensure_group: creates the consumer group (and stream) if missing; called after
        NOGROUP. None: NOGROUP propagates like any other error.
    """

    def __init__(
        self,
        ensure_group: Callable[[], Awaitable[None]] | None = None,
        *,
        base_s: float = _BASE_S,
        cap_s: float = _CAP_S,
    ) -> None:
        self._ensure_group = ensure_group
        self._base_s, self._cap_s = base_s, cap_s

    async def call(
        self,
        what: str,
        fn: Callable[[], Awaitable[T]],
        *,
        stop: asyncio.Event | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> T:
        """`await fn()` until it succeeds (fn is called afresh each time).

        stop: raise Interrupted once set while waiting to retry.
        on_error: told of each transient failure or NOGROUP (before the retry).
        Other errors propagate: they are bugs, not outages.
        """
        backoff = Backoff(self._base_s, self._cap_s)
        need_group = regrouped = False
        while True:
            try:
                if need_group and self._ensure_group is not None:
                    await self._ensure_group()
                    log.warning("%s: consumer group re-created", what)
                    need_group = False
                result = await fn()
            except TRANSIENT as exc:
                _log_failure(what, exc, backoff.failures)
                error: BaseException = exc
            except redis.exceptions.ResponseError as exc:
                if not is_nogroup(exc) or self._ensure_group is None:
                    raise
                log.warning("%s: consumer group missing (%s)", what, exc)
                need_group, error = True, exc
            else:
                if backoff.failures:
                    log.info("%s: recovered after %d failures", what, backoff.failures)
                return result
            if on_error is not None:
                on_error(error)
            if need_group and not regrouped:
                regrouped = True  # re-create it at once; should that not help, back off
                continue
            if await backoff.sleep(stop):
                raise Interrupted(what)


def _log_failure(what: str, exc: BaseException, failures: int) -> None:
    # The first failure of an outage is a warning; the retries that follow would flood.
    level = logging.WARNING if failures == 0 else logging.DEBUG
    log.log(level, "%s failed (%r); retrying", what, exc)


class Supervisor:
    """The service's background tasks; none may end unnoticed.

    on_death(name): called once per task that raised, or (for a `loop` task) returned
    while the service was not closing. Cancelled tasks are not deaths.
    """

    def __init__(self, on_death: Callable[[str], None]) -> None:
        self._on_death = on_death
        self._tasks: dict[asyncio.Task[Any], tuple[str, bool]] = {}
        self.closing = False

    @property
    def tasks(self) -> list[asyncio.Task[Any]]:
        return list(self._tasks)

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any], *, loop: bool) -> asyncio.Task[Any]:
        """Run `coro` as a task; `loop`: it should run until the service closes."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks[task] = (name, loop)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        name, loop = self._tasks.pop(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("background task %r died", name, exc_info=exc)
        elif loop and not self.closing:
            log.error("background task %r stopped while the worker runs", name)
        else:
            return
        self._on_death(name)

    async def stop(self, timeout_s: float) -> None:
        """Cancel every task and wait up to `timeout_s` for them to end."""
        self.closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=timeout_s)
            if stuck:
                log.warning("%d background tasks did not stop in time", len(stuck))
