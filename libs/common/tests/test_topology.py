"""The topology on a real broker: what is declared, idempotence, and loud mismatches."""

from __future__ import annotations

import pytest

from courier_common.messaging import TopologyMismatchError, declare_topology
from courier_common.messaging.connection import AmqpConnection
from courier_common.messaging.topology import Topology
from tests.support.fixtures import BrokerAdmin, BrokerVhost
from tests.support.messaging import TOPOLOGY, WORK


async def test_declares_every_name_of_the_contract(
    connection: AmqpConnection, vhost: BrokerVhost, broker_admin: BrokerAdmin
) -> None:
    channel = await connection.channel()
    await declare_topology(channel, TOPOLOGY)

    queues = {q["name"]: q for q in broker_admin.queues(vhost.name)}
    assert set(queues) == {
        "courier.dead-letters",
        "courier-test.work",
        "courier-test.work.retry.300ms",
        "courier-test.work.retry.600ms",
    }
    work = queues["courier-test.work"]
    assert work["type"] == "quorum"
    assert work["arguments"] == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 3,
        "x-dead-letter-exchange": "courier.dlx",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    tier = queues["courier-test.work.retry.300ms"]
    assert tier["type"] == "quorum"
    assert tier["arguments"] == {
        "x-queue-type": "quorum",
        "x-message-ttl": 300,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "courier-test.work",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    assert queues["courier.dead-letters"]["type"] == "quorum"

    exchanges = {
        e["name"]: e
        for e in broker_admin.client.get(f"/api/exchanges/{vhost.name}").json()
        if e["name"].startswith("courier.")
    }
    assert exchanges["courier.events"]["type"] == "topic"
    assert exchanges["courier.events"]["durable"] is True
    assert exchanges["courier.dlx"]["type"] == "fanout"
    bindings = broker_admin.client.get(f"/api/bindings/{vhost.name}").json()
    assert {(b["source"], b["destination"], b["routing_key"]) for b in bindings if b["source"]} == {
        ("courier.events", "courier-test.work", "user.*"),
        ("courier.events", "courier-test.work", "test.*"),
        ("courier.dlx", "courier.dead-letters", "#"),
    }


async def test_declaring_twice_is_harmless(connection: AmqpConnection) -> None:
    await declare_topology(await connection.channel(), TOPOLOGY)
    await declare_topology(await connection.channel(), TOPOLOGY)


async def test_existing_queue_with_other_arguments_fails_startup_clearly(
    connection: AmqpConnection,
) -> None:
    channel = await connection.channel()
    await channel.declare_queue(
        WORK.name,
        durable=True,
        arguments={**WORK.arguments(), "x-delivery-limit": 20},
    )
    with pytest.raises(TopologyMismatchError) as info:
        await declare_topology(await connection.channel(), TOPOLOGY)
    message = str(info.value)
    assert "queue 'courier-test.work'" in message
    assert "'x-delivery-limit'" in message
    assert "20" in message


async def test_classic_queue_in_the_way_is_named(connection: AmqpConnection) -> None:
    channel = await connection.channel()
    await channel.declare_queue("courier.dead-letters", durable=True)
    with pytest.raises(TopologyMismatchError, match=r"'courier.dead-letters'.*'x-queue-type'"):
        await declare_topology(await connection.channel(), Topology(work_queues=()))
