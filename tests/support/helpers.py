"""Small helpers shared by tests: polling, draining a queue, building raw messages."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel


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


def message_for(event: Any, **headers: Any) -> aio_pika.Message:
    """An AMQP message as Courier's publisher would build it for ``event``."""
    return aio_pika.Message(
        body=event.encode(),
        content_type="application/json",
        message_id=str(event.id),
        type=event.type,
        headers=headers,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def ready_count(channel: AbstractRobustChannel, queue_name: str) -> int:
    """Messages ready in a queue, from a passive declare: exact, unlike the management
    API's statistics, which lag by up to their collection interval (5 s by default)."""
    declared = await channel.declare_queue(queue_name, passive=True)
    result: Any = declared.declaration_result
    return int(result.message_count)


class EventTap:
    """A queue of our own bound to ``courier.events`` that collects what user-service emits."""

    def __init__(self, channel: AbstractRobustChannel, queue: AbstractQueue) -> None:
        self.channel = channel
        self.queue = queue
        self.messages: list[AbstractIncomingMessage] = []

    async def collect(self, count: int, *, timeout: float = 30) -> list[AbstractIncomingMessage]:
        async def enough() -> bool:
            while True:
                message = await self.queue.get(no_ack=True, fail=False)
                if message is None:
                    return len(self.messages) >= count
                self.messages.append(message)

        await eventually(enough, timeout=timeout, what=f"{count} events")
        return self.messages

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(m.body) for m in self.messages]


def user_payload(email: str = "ada@example.com", **extra: Any) -> dict[str, Any]:
    return {"email": email, "display_name": "Ada", "locale": "en", **extra}
