"""Stopping tasks when Python 3.11 loses a cancellation (courier_common.tasks)."""

from __future__ import annotations

import asyncio
import time

from courier_common.tasks import cancel_and_wait, pause


async def test_a_task_that_loses_its_cancellation_still_stops() -> None:
    # What Python 3.11's asyncio.wait_for, and so every redis-py command, can do: swallow a
    # cancellation that arrives as the awaited call completes, and let the loop go on.
    async def loop_that_swallows_one_cancel() -> None:
        swallowed = False
        while True:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed = True
                task = asyncio.current_task()
                assert task is not None
                task.uncancel()

    task = asyncio.create_task(loop_that_swallows_one_cancel())
    await asyncio.sleep(0)
    started = time.monotonic()
    assert await cancel_and_wait([task], timeout=5)
    assert task.cancelled()
    assert time.monotonic() - started < 1


async def test_pause_ends_early_when_stopping_is_set() -> None:
    stopping = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, stopping.set)
    started = time.monotonic()
    await pause(stopping, 30)
    assert stopping.is_set()
    assert time.monotonic() - started < 5
