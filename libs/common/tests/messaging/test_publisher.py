"""Confirmed publishing: a confirm means the message is in its queue; anything else raises."""

from __future__ import annotations

import asyncio

import pytest
from aio_pika.abc import AbstractRobustChannel
from yarl import URL

from courier_common.messaging import (
    OutgoingMessage,
    Publisher,
    PublishError,
    PublishNackedError,
    UnroutableError,
    WorkQueue,
    declare_topology,
    new_event,
)
from courier_common.messaging.connection import AmqpConnection
from courier_common.messaging.publisher import PublishConnectionError
from courier_common.messaging.topology import DeclaredTopology, Topology
from courier_common.metrics import MessagingMetrics
from courier_testing.events import Pinged
from courier_testing.polling import eventually, get_all, ready_count
from courier_testing.tcp_proxy import TcpProxy

from .support import TOPOLOGY


async def test_confirmed_publish_lands_in_its_queue(
    declared: DeclaredTopology, channel: AbstractRobustChannel, metrics: MessagingMetrics
) -> None:
    publisher = Publisher(channel, metrics=metrics)
    event = new_event(Pinged(n=1), source="tests")
    await publisher.publish_event(event)

    [message] = await get_all(channel, "courier-test.work", expect=1)
    assert message.body == event.encode()
    assert message.message_id == str(event.id)
    assert message.type == "test.pinged"
    assert message.content_type == "application/json"
    assert message.delivery_mode == 2
    assert message.routing_key == "test.pinged"
    assert message.timestamp is not None
    assert metrics.published.labels("courier.events", "confirmed")._value.get() == 1


async def test_unroutable_publish_raises(
    declared: DeclaredTopology, channel: AbstractRobustChannel, metrics: MessagingMetrics
) -> None:
    publisher = Publisher(channel, metrics=metrics)
    with pytest.raises(UnroutableError, match=r"no queue is bound.*nobody\.listens"):
        await publisher.publish(
            OutgoingMessage(exchange="courier.events", routing_key="nobody.listens", body=b"{}")
        )
    assert metrics.published.labels("courier.events", "returned")._value.get() == 1


async def test_full_queue_nacks_instead_of_dropping(
    connection: AmqpConnection, metrics: MessagingMetrics
) -> None:
    small = WorkQueue(name="small", binding_keys=("test.*",), max_length=2)
    await declare_topology(await connection.channel(), Topology(work_queues=(small,)))
    channel = await connection.channel()
    publisher = Publisher(channel, metrics=metrics)
    confirmed = 0
    # A quorum queue's limit is soft (a publish in flight may still land), so publish until
    # the broker refuses; what matters is that a refused message is reported, not dropped.
    for n in range(10):
        try:
            await publisher.publish_event(new_event(Pinged(n=n), source="t"))
        except PublishNackedError as exc:
            refused = str(exc)
            break
        confirmed += 1
    else:
        pytest.fail("the broker never refused a publish to a full queue")
    assert "queue full" in refused
    assert confirmed >= 2
    assert await ready_count(channel, "small") == confirmed
    assert metrics.published.labels("courier.events", "nacked")._value.get() == 1


async def test_batch_results_are_per_message_and_in_order(
    declared: DeclaredTopology, channel: AbstractRobustChannel
) -> None:
    publisher = Publisher(channel)
    batch = [OutgoingMessage.for_event(new_event(Pinged(n=i), source="t")) for i in range(200)]
    batch[7] = OutgoingMessage(exchange="courier.events", routing_key="nowhere", body=b"{}")
    results = await publisher.publish_many(batch)
    assert [i for i, r in enumerate(results) if r is not None] == [7]
    assert isinstance(results[7], UnroutableError)
    got = await get_all(channel, "courier-test.work", expect=199)
    assert len({m.message_id for m in got}) == 199


@pytest.mark.slow
async def test_a_connection_dropped_as_stuck_fails_the_publish_and_then_recovers(
    amqp_url: str, metrics: MessagingMetrics
) -> None:
    """A broker that stops answering: once the heartbeat gives up, the publish waiting for its
    confirm fails with a PublishError (aiormq cancels it; that must not cancel the caller),
    and the same publisher works again after the reconnect."""
    upstream = URL(amqp_url)
    assert upstream.host is not None
    assert upstream.port is not None
    with TcpProxy(upstream.host, upstream.port) as proxy:
        connection = await AmqpConnection(
            str(upstream.with_port(proxy.port)),
            client_name="stuck-test",
            heartbeat=1,
            reconnect_interval=0.2,
        ).connect(timeout=10)
        try:
            await declare_topology(await connection.channel(), TOPOLOGY)
            publisher = Publisher(await connection.channel(), metrics=metrics, confirm_timeout=60)
            await publisher.publish_event(new_event(Pinged(n=1), source="t"))
            proxy.blackhole()  # nothing answers any more, not even heartbeats
            with pytest.raises(PublishConnectionError, match="dropped"):
                await asyncio.wait_for(
                    publisher.publish_event(new_event(Pinged(n=2), source="t")), 60
                )
            proxy.blackhole(False)

            async def published() -> bool:
                try:
                    await publisher.publish_event(new_event(Pinged(n=3), source="t"))
                except PublishError:
                    return False
                return True

            await eventually(published, timeout=60, interval=0.5, what="a publish after it")
        finally:
            await connection.close()
