"""Registration while the broker is down, on a private RabbitMQ node that the test kills.

The relay's own faults (a relay SIGKILLed mid-batch, a refused batch, replicas that do not
confirm) are tested with the relay, in libs/common/tests/outbox.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiormq
import httpx
import pytest
import redis.asyncio
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from courier_common.messaging import AmqpConnection
from courier_testing.polling import eventually
from courier_testing.private_services import PrivateRabbitMQ
from tests.support.processes import ServiceRunner

pytestmark = pytest.mark.fault


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


@pytest.fixture
async def private_tap(private_rabbitmq: PrivateRabbitMQ) -> AsyncIterator[DurableTap]:
    connection = await AmqpConnection(
        private_rabbitmq.url, client_name="tap", reconnect_interval=0.5
    ).connect()
    channel = await connection.channel()
    exchange = await channel.declare_exchange(
        "courier.events", aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(
        "test.tap", durable=True, arguments={"x-queue-type": "quorum"}
    )
    await queue.bind(exchange, "user.*")
    yield DurableTap(queue)
    await connection.close()


def service_env(amqp_url: str, redis_url: str, redis_prefix: str, **extra: str) -> dict[str, str]:
    return {
        "COURIER_AMQP_URL": amqp_url,
        "COURIER_REDIS_URL": redis_url,
        "COURIER_REDIS_PREFIX": redis_prefix,
        "COURIER_OUTBOX_BLOCK_MS": "100",
        "COURIER_OUTBOX_RETRY_MAX_SECONDS": "0.5",
        "COURIER_AMQP_HEARTBEAT_SECONDS": "2",
        **extra,
    }


async def register(client: httpx.AsyncClient, emails: list[str]) -> set[str]:
    responses = await asyncio.gather(
        *(client.post("/v1/users", json={"email": e, "display_name": "U"}) for e in emails)
    )
    assert Counter(r.status_code for r in responses) == {201: len(emails)}
    return {r.json()["id"] for r in responses}


async def outbox_len(client: redis.asyncio.Redis, prefix: str) -> int:
    return int(await client.xlen(prefix + "outbox"))


async def test_registration_works_while_the_broker_is_down(
    private_rabbitmq: PrivateRabbitMQ,
    private_tap: DurableTap,
    services: ServiceRunner,
    redis_url: str,
    redis_prefix: str,
    redis_client: redis.asyncio.Redis,
) -> None:
    service = services.start(
        "user-service", service_env(private_rabbitmq.url, redis_url, redis_prefix)
    )
    async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
        before = await register(client, [f"before{i}@example.com" for i in range(20)])
        await private_tap.collect(20)

        async def outbox_idle() -> bool:
            return await outbox_len(redis_client, redis_prefix) == 0

        await eventually(outbox_idle, what="an idle outbox")
        await asyncio.to_thread(private_rabbitmq.kill)
        during = await register(client, [f"during{i}@example.com" for i in range(30)])
        ready = (await client.get("/readyz")).json()
        assert ready["ready"] is True
        assert ready["broker"] == "disconnected"
        assert await outbox_len(redis_client, redis_prefix) == 30
        await asyncio.to_thread(private_rabbitmq.start)

        bodies = await private_tap.collect(50)
        await asyncio.sleep(2)
        bodies = await private_tap.collect(50)
    ids = Counter(b["data"]["user_id"] for b in bodies)
    assert set(ids) == before | during
    assert max(ids.values()) == 1  # none twice
    assert await outbox_len(redis_client, redis_prefix) == 0
