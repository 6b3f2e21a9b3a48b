"""Waiting for what a test expects instead of sleeping: `eventually`, and reading a queue.

A test that sleeps and then looks either waits longer than it must or, on a loaded machine,
looks too early. These poll until the condition holds (or fail, saying what they waited for).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    *,
    timeout: float = 15.0,
    interval: float = 0.05,
    what: str = "condition",
) -> None:
    """Poll until ``check`` is true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def get_all(
    channel: AbstractRobustChannel, queue_name: str, *, expect: int, timeout: float = 15.0
) -> list[AbstractIncomingMessage]:
    """Take ``expect`` messages off a queue (basic.get, acked), waiting up to ``timeout``."""
    queue = await channel.get_queue(queue_name, ensure=False)
    got: list[AbstractIncomingMessage] = []

    async def fetch() -> bool:
        while len(got) < expect:
            message = await queue.get(fail=False, no_ack=True)
            if message is None:
                return False
            got.append(message)
        return True

    await eventually(fetch, timeout=timeout, what=f"{expect} messages on {queue_name}")
    return got


async def queue_counts(channel: AbstractRobustChannel, queue_name: str) -> tuple[int, int]:
    """(messages ready, consumers) of a queue now, from a passive declare: exact, unlike the
    management API's statistics, which lag by up to their collection interval (5 s).

    Declared on the channel underneath: aio-pika's robust channel answers a passive declare
    of a queue it declared before with that first declaration's counts, never asking again.
    """
    underlay = await channel.get_underlay_channel()
    declared = await underlay.queue_declare(queue_name, passive=True)
    return int(declared.message_count or 0), int(declared.consumer_count or 0)


async def ready_count(channel: AbstractRobustChannel, queue_name: str) -> int:
    """Messages ready in a queue now (see `queue_counts`)."""
    ready, _consumers = await queue_counts(channel, queue_name)
    return ready
