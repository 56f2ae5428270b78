"""Read loop stage: adopt → reclaim → read with backpressure, one short poll iteration at a time.

Reads only while the job table has room (else waits for a change or a heartbeat period);
reclaims idle entries of dead consumers once per heartbeat period (every round in burst
mode); in burst mode stops once a round finds nothing and nothing is held. Each round's
entries go straight to intake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from worker.service.intake import Intake
from worker.service.jobs import JobTable
from worker.service.reader import StreamReader
from worker.service.recovery import Entry, Recovery
from worker.service.resilience import Interrupted, Retrier
from worker.service.settings import WorkerConfig

log = logging.getLogger(__name__)


class ReadLoop:
    """The worker's read loop: `run()` returns once `stopping` is set (or burst mode ran dry).

    changed: set whenever a held job or refusal is released (room may have come back).
    """

    def __init__(
        self,
        config: WorkerConfig,
        jobs: JobTable,
        reader: StreamReader,
        recovery: Recovery,
        intake: Intake,
        retry: Retrier,
        stopping: asyncio.Event,
        changed: asyncio.Event,
    ) -> None:
        self.config = config
        self.jobs = jobs
        self.reader = reader
        self.recovery = recovery
        self.intake = intake
        self._retry = retry
        self._stopping = stopping
        self._changed = changed

    async def run(self) -> None:
        next_reclaim = 0.0
        while not self._stopping.is_set():
            if self.jobs.room <= 0:
                self._changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), self.config.heartbeat_s)
                continue
            reclaim = self.config.burst or time.monotonic() >= next_reclaim
            try:
                got = await self._fetch(reclaim)
            except Interrupted:
                break
            if reclaim:
                next_reclaim = time.monotonic() + self.config.heartbeat_s
            if not got and self.config.burst and self._idle():
                log.info("burst: queue empty, stopping")
                self._stopping.set()
        # A blocking read of another shard may still deliver: what it delivers is ours to run
        # (like the single blocking read of one shard, which a stop never cuts short).
        try:
            self.intake.admit(await self.reader.settle())
        except Exception as exc:  # noqa: BLE001 - its entries stay pending; reclaimed later
            log.warning("a last blocking read failed (%r); its entries are reclaimed later", exc)

    def _idle(self) -> bool:
        """Nothing held and nothing left to adopt (burst mode stops then)."""
        return self.jobs.empty and not self.recovery.adoption_due

    async def _fetch(self, reclaim: bool) -> int:
        """One round: adopt our orphans, reclaim idle entries, read new ones; how many came.

        NOTE: each step's entries are admitted as soon as they arrive, so a later step that
        fails never loses them, and a retry reads nothing twice: a retry after a dropped
        connection costs no delivery.
        """
        recovery, admit, got = self.recovery, self.intake.admit, 0
        if recovery.adoption_due:
            # Blocking reads still in flight hold entries pending under our name: take them
            # first, or adoption would hand them out a second time.
            got += admit(await self._call("finishing reads", self.reader.settle))
            got += admit(await self._call("adopting entries", recovery.adopt))
        if reclaim:
            got += admit(
                await self._call("reclaiming jobs", lambda: recovery.reclaim(self.jobs.room))
            )
        if self.jobs.room > 0:
            # Blocks only when nothing came: admitted entries are waiting for their start.
            block = None if got else self.config.read_block_ms
            got += admit(
                await self._call("reading jobs", lambda: self.reader.read(self.jobs.room, block))
            )
        return got

    async def _call(self, what: str, fn: Callable[[], Awaitable[list[Entry]]]) -> list[Entry]:
        # A failed read or claim may have delivered entries whose reply was lost: look
        # for them under our own name before the next read.
        def suspect(_exc: BaseException) -> None:
            self.recovery.adoption_due = True

        return await self._retry.call(what, fn, stop=self._stopping, on_error=suspect)
