"""Lost-job watch (producer side): notice the jobs Redis lost; `headrace bulk` resubmits them.

Redis can lose jobs in flight: a restart without persistence, a failover to a
replica that lagged, a FLUSHALL. Every `check_s` the watch reads the server's run_id
and where each job in flight is (`Submitter.locate`). A job with no final result, no
stream entry and no pending entry is lost: at once after a sign that the server's data
may have changed (a new run_id, a lost connection), else once it has stayed out of
sight for `lost_after_s` (a worker that outlived a FLUSHALL may still be running it,
and its result would still come). `headrace bulk` resubmits lost jobs under the same id,
so a job that was in fact still running answers once: only one final result per id is
kept. The clients (AsyncClient, Client) use the same watch, locating their jobs only after
such a sign, and count and report the lost ones (JobLostError).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.submission import LOST, Submission

if TYPE_CHECKING:  # the client runs a watch of its own: no import cycle at run time
    from producer.client import AsyncClient

log = logging.getLogger(__name__)

# NoScriptError: Redis restarted empty between the pipeline's script load and its EVALSHA;
# the retry loads the script again.
# ClusterDownError, TryAgainError, ReadOnlyError: a failover under way (cluster or Sentinel).
REDIS_ERRORS = (
    RedisConnectionError,
    RedisTimeoutError,
    NoScriptError,
    ClusterDownError,
    TryAgainError,
    ReadOnlyError,
    OSError,
)


class RedisGoneError(RedisConnectionError):
    """Redis stayed unreachable for longer than the run waits for it."""


@dataclass(frozen=True)
class WatchConfig:
    """check_s: how often the jobs in flight are located.
    lost_after_s: how long a job may stay out of sight (no result, stream entry or
        pending entry) before it is resubmitted, when nothing says Redis lost data.
    redis_down_s: how long Redis may stay unreachable before the run fails.
    """

    check_s: float = 2.0
    lost_after_s: float = 30.0
    redis_down_s: float = 120.0

    def __post_init__(self) -> None:
        if min(self.check_s, self.lost_after_s, self.redis_down_s) <= 0:
            raise ValueError("watch intervals must be > 0")


class LostJobWatch:
    """Tells lost jobs from their locations and what happened to the server (no I/O)."""

    def __init__(self, config: WatchConfig) -> None:
        self.config = config
        self._run_id: str | None = None
        self._suspect = False  # the server's data may have changed since the last check
        self._down_since: float | None = None
        self._out_of_sight: dict[str, float] = {}  # job id → first seen LOST

    def saw_server(self, run_id: str) -> None:
        if self._run_id is not None and run_id != self._run_id:
            log.warning("Redis restarted or failed over (new run_id): checking every job")
            self._suspect = True
        self._run_id = run_id

    def redis_failed(self, error: BaseException, now: float | None = None) -> None:
        """A Redis call failed; raises RedisGoneError once Redis was gone `redis_down_s`."""
        now = time.monotonic() if now is None else now
        self._suspect = True
        if self._down_since is None:
            self._down_since = now
            log.warning(
                "Redis unreachable (%s): waiting up to %.0f s", error, self.config.redis_down_s
            )
        elif now - self._down_since > self.config.redis_down_s:
            raise RedisGoneError(
                f"Redis unreachable for {now - self._down_since:.0f} s: {error}"
            ) from error

    def data_may_be_lost(self) -> None:
        """A sign from elsewhere (e.g. a reader's failed call): locate every job next time."""
        self._suspect = True

    def redis_ok(self) -> None:
        self._down_since = None

    def lost(self, places: Mapping[str, str], now: float | None = None) -> list[str]:
        """The located jobs to resubmit now; forgets jobs no longer located."""
        now = time.monotonic() if now is None else now
        suspect, self._suspect = self._suspect, False
        lost = []
        for job_id, place in places.items():
            if place != LOST:
                self._out_of_sight.pop(job_id, None)
                continue
            since = self._out_of_sight.setdefault(job_id, now)
            if suspect or now - since >= self.config.lost_after_s:
                lost.append(job_id)
                del self._out_of_sight[job_id]
        for job_id in set(self._out_of_sight) - set(places):
            del self._out_of_sight[job_id]
        return lost

    async def enqueue(
        self, client: AsyncClient, jobs: list[dict[str, Any]], *, resubmit: bool
    ) -> list[Submission]:
        """`client.enqueue`, retried while Redis is away (RedisGoneError once away too long)."""
        again = resubmit

        async def send() -> list[Submission]:
            # After a failed try some jobs may be queued already: queue them regardless.
            return await client.enqueue(jobs, resubmit=again)

        async def failed(error: Exception) -> None:
            nonlocal again
            again = True
            self.redis_failed(error)

        backoff = ExponentialBackoff(cap=self.config.check_s, base=0.1)
        retry = Retry(backoff, retries=-1, supported_errors=REDIS_ERRORS)
        subs = await retry.call_with_retry(send, failed)
        self.redis_ok()
        return subs

    async def run(
        self,
        client: AsyncClient,
        in_flight: Callable[[], list[Submission]],
        resubmit: Callable[[list[str]], Awaitable[None]],
    ) -> None:
        """Check every `check_s` until cancelled; `resubmit` gets the lost jobs' ids (a client
        reports them instead). With an infinite `lost_after_s` jobs are located only after a
        sign of lost data. Raises RedisGoneError."""
        while True:
            await asyncio.sleep(self.config.check_s)
            try:
                await self._check(client, in_flight, resubmit)
                self.redis_ok()
            except RedisGoneError:
                raise
            except REDIS_ERRORS as exc:
                self.redis_failed(exc)

    async def _check(
        self,
        client: AsyncClient,
        in_flight: Callable[[], list[Submission]],
        resubmit: Callable[[list[str]], Awaitable[None]],
    ) -> None:
        jobs = in_flight()
        with contextlib.suppress(ResponseError):  # INFO may be disabled: locations still tell
            self.saw_server(await client.server_run_id())
        if math.isinf(self.config.lost_after_s) and not self._suspect:
            return  # only a sign of lost data makes a job lost: nothing to locate
        lost = self.lost(await client.locate(jobs))
        if lost:
            await resubmit(lost)
