"""Stopping background tasks on Python 3.11, where a cancellation can be lost.

``asyncio.wait_for`` swallows a cancellation that arrives as the awaited operation completes
(CPython gh-86296, fixed in 3.12), and redis-py sends every command through ``wait_for`` when a
socket timeout is set. A task cancelled during a Redis call can therefore carry on as if
nothing happened: a loop never ends, and shutdown waits for it forever. So loops also watch a
stop event (:func:`pause`), and :func:`cancel_and_wait` cancels again until a task ends,
within a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

from courier_common.logging import get_logger

log = get_logger(__name__)

#: How often a task that has not ended yet is cancelled again.
_RECANCEL_INTERVAL = 0.1


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], *, timeout: float = 2.0) -> bool:
    """Cancel ``tasks`` (again, if a cancellation is lost) until they end, up to ``timeout``.

    True when every task ended; the ones that did not are logged and left behind.
    """
    pending = {task for task in tasks if not task.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(
            pending, timeout=min(_RECANCEL_INTERVAL, max(0.0, deadline - loop.time()))
        )
    for task in pending:
        log.warning("task_did_not_stop", task=task.get_name(), timeout_s=timeout)
    return not pending


async def pause(stopping: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if ``stopping`` is set meanwhile."""
    if seconds <= 0 or stopping.is_set():
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stopping.wait()
