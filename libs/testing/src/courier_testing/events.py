"""Events as Courier's publishers would put them on the wire, for tests and the benchmark."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel

from courier_common.events import USER_SERVICE_SOURCE, UserRegistered
from courier_common.messaging import AmqpConnection, Event, EventData, new_event, new_event_id
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


class DurableTap:
    """A durable quorum queue bound to ``courier.events``: it survives the broker's death."""

    def __init__(self, queue: AbstractQueue) -> None:
        self.queue = queue
        self.messages: list[AbstractIncomingMessage] = []

    async def collect(self, count: int, *, timeout: float = 60) -> list[dict[str, Any]]:
        async def enough() -> bool:
            try:
                while (message := await self.queue.get(no_ack=True, fail=False)) is not None:
                    self.messages.append(message)
            except (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError):
                # The tap's own channel is still closed or reconnecting after the restart
                # (ChannelInvalidStateError is a RuntimeError, not an AMQPError).
                return False
            return len(self.messages) >= count

        await eventually(enough, timeout=timeout, interval=0.2, what=f"{count} events")
        return [json.loads(m.body) for m in self.messages]


@asynccontextmanager
async def durable_tap(amqp_url: str, *, queue: str, binding: str) -> AsyncIterator[DurableTap]:
    """A :class:`DurableTap` named ``queue`` on ``binding``, over a connection that reconnects."""
    connection = await AmqpConnection(amqp_url, client_name="tap", reconnect_interval=0.5).connect()
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            "courier.events", aio_pika.ExchangeType.TOPIC, durable=True
        )
        tap = await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
        await tap.bind(exchange, binding)
        yield DurableTap(tap)
    finally:
        await connection.close()
