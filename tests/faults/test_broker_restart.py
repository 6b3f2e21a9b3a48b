"""The broker dies under a running publisher and consumer; the process recovers by itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from uuid import UUID

import pytest
from prometheus_client import CollectorRegistry

from courier_common.messaging import (
    AmqpConnection,
    ConsumerRunner,
    Event,
    EventData,
    Publisher,
    PublishError,
    Router,
    Topology,
    WorkQueue,
    declare_topology,
    new_event,
)
from courier_common.metrics import MessagingMetrics
from courier_testing.polling import eventually
from courier_testing.private_services import PrivateRabbitMQ

pytestmark = pytest.mark.fault


class Pinged(EventData):
    """The event these tests publish and consume (no service's: the library alone is tested)."""

    event_type = "test.pinged"
    event_version = 1

    n: int


WORK = WorkQueue(name="courier-test.restart", binding_keys=("test.*",))
TOPOLOGY = Topology(work_queues=(WORK,))


@pytest.fixture
async def connection(private_rabbitmq: PrivateRabbitMQ) -> AsyncIterator[AmqpConnection]:
    conn = await AmqpConnection(
        private_rabbitmq.url, client_name="fault-test", heartbeat=2, reconnect_interval=0.5
    ).connect(timeout=30)
    yield conn
    await conn.close()


async def consumers_on(url: str, queue: str) -> int:
    """The broker's own count of consumers on ``queue``, from a separate connection."""
    probe = await AmqpConnection(url, client_name="probe").connect(timeout=10)
    try:
        channel = await probe.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.consumer_count or 0)
    finally:
        await probe.close()


async def test_broker_killed_and_restarted_loses_no_confirmed_message(
    private_rabbitmq: PrivateRabbitMQ, connection: AmqpConnection
) -> None:
    await declare_topology(await connection.channel(), TOPOLOGY)
    handled: set[UUID] = set()

    async def handler(event: Event[Pinged]) -> None:
        handled.add(event.id)

    router = Router()
    router.add(Pinged, handler)
    runner = ConsumerRunner(
        connection=connection,
        queue=WORK,
        router=router,
        metrics=MessagingMetrics(CollectorRegistry()),
        consumer_name="fault-test",
        prefetch=10,
    )
    await runner.start()
    publisher = Publisher(await connection.channel(), confirm_timeout=5)
    confirmed: list[UUID] = []
    refused: list[PublishError] = []

    async def publish_until_confirmed(n: int) -> None:
        """What the outbox relay does: keep the event until the broker confirms it."""
        event = new_event(Pinged(n=n), source="fault-test")
        while True:
            try:
                await publisher.publish_event(event)
            except PublishError as exc:
                refused.append(exc)
                await asyncio.sleep(0.2)
                continue
            confirmed.append(event.id)
            return

    async def produce(start: int, count: int) -> None:
        for n in range(start, start + count):
            await publish_until_confirmed(n)
            await asyncio.sleep(0.01)

    producer = asyncio.create_task(produce(0, 150))
    await eventually(lambda: len(confirmed) >= 30, what="30 confirmed before the kill")
    await asyncio.to_thread(private_rabbitmq.kill)
    await eventually(lambda: len(refused) >= 2, timeout=30, what="publishes to the dead broker")
    assert not producer.done()  # it is waiting for the broker, holding its event
    await asyncio.to_thread(private_rabbitmq.start)
    await asyncio.wait_for(producer, 120)

    await eventually(
        lambda: handled >= set(confirmed),
        timeout=60,
        what="every confirmed message to be consumed after the restart",
    )
    assert len(confirmed) == 150
    assert await consumers_on(private_rabbitmq.url, WORK.name) == 1
    assert connection.is_connected
    await runner.stop(timeout=5)


async def test_graceful_broker_restart_resubscribes_the_consumer(
    private_rabbitmq: PrivateRabbitMQ, connection: AmqpConnection
) -> None:
    await declare_topology(await connection.channel(), TOPOLOGY)
    handled: list[int] = []

    async def handler(event: Event[Pinged]) -> None:
        handled.append(event.data.n)

    router = Router()
    router.add(Pinged, handler)
    runner = ConsumerRunner(
        connection=connection,
        queue=WORK,
        router=router,
        metrics=MessagingMetrics(CollectorRegistry()),
        consumer_name="fault-test",
    )
    await runner.start()
    await asyncio.to_thread(private_rabbitmq.restart, graceful=True)

    async def resubscribed() -> bool:
        return await consumers_on(private_rabbitmq.url, WORK.name) == 1

    await eventually(resubscribed, timeout=60, interval=0.5, what="the consumer to come back")
    publisher = Publisher(await connection.channel())
    await publisher.publish_event(new_event(Pinged(n=7), source="fault-test"))
    await eventually(lambda: handled == [7], timeout=30, what="a message after the restart")
    await runner.stop(timeout=5)
