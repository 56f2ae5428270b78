"""cancel_and_wait: background loops end even when a cancel is lost (Python < 3.12's wait_for)."""

from __future__ import annotations

import asyncio

from producer.tasks import cancel_and_wait


async def _loses_first_cancel() -> None:
    """A loop whose first cancel is swallowed, like one landing in a redis-py call that
    asyncio.wait_for completes anyway; the loop then carries on."""
    lost = False
    while True:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            if lost:
                raise
            lost = True
            asyncio.current_task().uncancel()  # type: ignore[union-attr]


def test_one_cancel_is_not_enough_for_a_loop_that_loses_it() -> None:
    async def main() -> bool:
        task = asyncio.create_task(_loses_first_cancel())
        await asyncio.sleep(0.02)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=0.5)
        ended = bool(done)
        await cancel_and_wait([task])
        return ended

    assert asyncio.run(main()) is False


def test_cancel_and_wait_ends_loops_that_lose_a_cancel_and_retrieves_errors() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    async def main() -> tuple[bool, bool, bool]:
        stubborn = asyncio.create_task(_loses_first_cancel())
        failed = asyncio.create_task(fails())
        finished = asyncio.create_task(asyncio.sleep(0))
        await asyncio.sleep(0.02)
        await asyncio.wait_for(cancel_and_wait([stubborn, None, failed, finished]), 5)
        return stubborn.done(), failed.done(), finished.done()

    assert asyncio.run(main()) == (True, True, True)
