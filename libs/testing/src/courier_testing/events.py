"""Events as Courier's publishers would put them on the wire, for tests and the benchmark."""

from __future__ import annotations

import json
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel

from courier_common.events import USER_SERVICE_SOURCE, UserRegistered
from courier_common.messaging import Event, EventData, new_event, new_event_id
from courier_testing.polling import eventually


class Pinged(EventData):
    """The library tests' own event type: no service's, so they prove the library alone."""

    event_type = "test.pinged"
    event_version = 1

    n: int
    note: str = ""


class EventTap:
    """A queue of our own bound to ``courier.events`` that collects what is published there."""

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


def user_registered(email: str, **contact: Any) -> Event[UserRegistered]:
    """A ``user.registered`` event as user-service emits it, for a contact nobody registered:
    a fresh user id, and Ada, ``en``, email only unless *contact* says otherwise."""
    fields: dict[str, Any] = {
        "user_id": new_event_id(),
        "email": email,
        "display_name": "Ada",
        "locale": "en",
        "channels": ("email",),
        **contact,
    }
    return new_event(UserRegistered(**fields), source=USER_SERVICE_SOURCE)


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
