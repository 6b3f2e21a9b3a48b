"""Small helpers for tests of the Courier stack: what user-service emits, and what it takes."""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel

from courier_testing.polling import eventually


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


async def outbox_emptied(client: redis.asyncio.Redis, prefix: str, timeout: float = 15) -> None:
    """Until user-service's outbox (under *prefix*) holds nothing.

    An entry leaves the outbox once the broker has confirmed its event, and a confirmed event
    is in every queue bound for it already: after this, a tap holds all the service emitted.
    """

    async def empty() -> bool:
        return int(await client.xlen(f"{prefix}outbox")) == 0

    await eventually(empty, timeout=timeout, what="the outbox to be published")
