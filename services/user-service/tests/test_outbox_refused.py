"""A batch the broker refuses: the relay retries it on a fresh channel, and nothing is lost."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aio_pika
import redis.asyncio
import structlog

from courier_common.messaging import AmqpConnection
from tests.support.fixtures import BrokerAdmin, BrokerVhost
from tests.support.helpers import eventually, user_payload
from user_service.config import Settings


async def test_a_refused_batch_is_retried_on_a_new_channel_until_it_gets_through(
    settings: Settings,
    make_client: Callable[[Settings], Any],
    vhost: BrokerVhost,
    broker_admin: BrokerAdmin,
    redis_client: redis.asyncio.Redis,
    redis_prefix: str,
) -> None:
    # The only queue bound to user.*, over its length limit, so refusing publishes.
    connection = await AmqpConnection(vhost.amqp_url, client_name="test").connect()
    channel = await connection.channel()
    exchange = await channel.declare_exchange(
        "courier.events", aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(
        "test.capped",
        durable=True,
        arguments={"x-queue-type": "quorum", "x-max-length": 1, "x-overflow": "reject-publish"},
    )
    await queue.bind(exchange, "user.*")
    # A quorum queue applies its limit once it is over it: two fillers put it in that state.
    for _ in range(2):
        await channel.default_exchange.publish(aio_pika.Message(b"filler"), routing_key=queue.name)
    try:
        with structlog.testing.capture_logs() as logs:
            async with make_client(settings) as client:
                response = await client.post("/v1/users", json=user_payload(email="b@example.com"))
                assert response.status_code == 201, response.text

                def renewed() -> bool:
                    return any(line["event"] == "outbox_channel_renewed" for line in logs)

                await eventually(renewed, timeout=20, what="the relay to renew its channel")
                assert await redis_client.xlen(f"{redis_prefix}outbox") == 1  # b, kept

                await queue.purge()

                async def drained() -> bool:
                    return bool(await redis_client.xlen(f"{redis_prefix}outbox") == 0)

                await eventually(drained, timeout=20, what="b published once there is room")
        refused = [line for line in logs if line["event"] == "outbox_publish_failed"]
        assert refused
        assert all("refused" in line["error"] for line in refused)
        message = await queue.get(timeout=5)
        assert b"b@example.com" in message.body  # the filler was purged: this is b's event
    finally:
        await connection.close()
