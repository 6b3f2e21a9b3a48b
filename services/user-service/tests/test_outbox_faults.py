"""Registration while the broker is down, on a private RabbitMQ node that the test kills.

The relay's own faults (a relay SIGKILLed mid-batch, a refused batch, replicas that do not
confirm) are tested with the relay, in libs/common/tests/outbox.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio

from courier_testing.events import DurableTap, durable_tap
from courier_testing.polling import eventually
from courier_testing.private_services import PrivateRabbitMQ
from tests.support.processes import ServiceRunner

pytestmark = pytest.mark.fault


@pytest.fixture
async def private_tap(private_rabbitmq: PrivateRabbitMQ) -> AsyncIterator[DurableTap]:
    async with durable_tap(private_rabbitmq.url, queue="test.tap", binding="user.*") as tap:
        yield tap


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
