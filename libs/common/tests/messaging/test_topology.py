"""The topology on a real broker: what is declared, idempotence, and loud mismatches."""

from __future__ import annotations

from typing import Any

import aio_pika
import aiormq
import pytest

from courier_common.messaging import TopologyMismatchError, WorkQueue, declare_topology
from courier_common.messaging.connection import AmqpConnection
from courier_common.messaging.topology import Topology, declare_queue
from courier_testing.backing import BrokerAdmin, BrokerVhost

from .support import TOPOLOGY, WORK


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


async def test_declaring_twice_is_harmless(
    connection: AmqpConnection, broker_admin: BrokerAdmin, vhost: BrokerVhost
) -> None:
    def snapshot() -> tuple[object, ...]:
        queues = broker_admin.client.get(f"/api/queues/{vhost.name}").json()
        bindings = broker_admin.client.get(f"/api/bindings/{vhost.name}").json()
        return (
            sorted((q["name"], sorted(q["arguments"].items())) for q in queues),
            sorted((b["source"], b["destination"], b["routing_key"]) for b in bindings),
        )

    await declare_topology(await connection.channel(), TOPOLOGY)
    first = snapshot()
    channel = await connection.channel()
    await declare_topology(channel, TOPOLOGY)
    assert not channel.is_closed  # no PRECONDITION_FAILED
    assert snapshot() == first
    assert first[0]  # it did declare something


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


GROUPED = WorkQueue(
    name=WORK.name,
    binding_keys=WORK.binding_keys,
    retry=WORK.retry,
    delivery_limit=WORK.delivery_limit,
    initial_group_size=3,
)


async def test_queues_are_created_with_the_initial_group_size(
    connection: AmqpConnection, vhost: BrokerVhost, broker_admin: BrokerAdmin
) -> None:
    """On one node the broker caps the group at one member, and the queue works."""
    topology = Topology(work_queues=(GROUPED,), initial_group_size=3)
    declared = await declare_topology(await connection.channel(), topology)
    queues: dict[str, Any] = {str(q["name"]): q for q in broker_admin.queues(vhost.name)}
    for name in (WORK.name, *GROUPED.retry_queue_names, "courier.dead-letters"):
        assert queues[name]["arguments"]["x-quorum-initial-group-size"] == 3, name
        members = queues[name].get("members")
        assert members is None or len(members) == 1, members  # capped at the cluster's size
    channel = await connection.channel()
    await channel.default_exchange.publish(aio_pika.Message(b"x"), routing_key=WORK.name)
    assert (await declared.queues[WORK.name].get(timeout=10)).body == b"x"


@pytest.mark.parametrize(
    ("existing", "configured"),
    [(None, 3), (3, None), (3, 5)],
    ids=["created-before-the-setting", "setting-removed", "setting-changed"],
)
async def test_an_existing_queue_keeps_its_group_size_instead_of_failing_startup(
    connection: AmqpConnection,
    vhost: BrokerVhost,
    broker_admin: BrokerAdmin,
    existing: int | None,
    configured: int | None,
) -> None:
    """The broker checks the argument on re-declaration (PRECONDITION_FAILED, on 3.10 and
    4.0 alike) though it only acts at creation: a deployment that upgrades keeps its queues."""
    channel = await connection.channel()
    arguments = {**WORK.arguments()}
    if existing is not None:
        arguments["x-quorum-initial-group-size"] = existing
    await channel.declare_queue(WORK.name, durable=True, arguments=arguments)
    # The broker refuses the plain re-declaration: that is what declare_queue absorbs.
    probe = await connection.channel()
    changed = {k: v for k, v in arguments.items() if k != "x-quorum-initial-group-size"}
    if configured is not None:
        changed["x-quorum-initial-group-size"] = configured
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
        await probe.declare_queue(WORK.name, durable=True, arguments=changed)

    work = WorkQueue(
        name=WORK.name,
        binding_keys=WORK.binding_keys,
        retry=WORK.retry,
        delivery_limit=WORK.delivery_limit,
        initial_group_size=configured,
    )
    await declare_topology(
        await connection.channel(), Topology(work_queues=(work,), initial_group_size=configured)
    )
    queue: dict[str, Any] = broker_admin.queue(vhost.name, WORK.name)
    assert queue["arguments"].get("x-quorum-initial-group-size") == existing
    # Any other difference is still a mismatch that stops startup.
    with pytest.raises(TopologyMismatchError, match="x-delivery-limit"):
        await declare_queue(
            await connection.channel(), WORK.name, {**changed, "x-delivery-limit": 99}
        )


async def test_deleting_a_quorum_queue_must_say_if_unused_false(
    amqp_url: str, broker_admin: BrokerAdmin, vhost: BrokerVhost
) -> None:
    """``queue.delete`` with if-unused (the default of aio-pika's ``Queue.delete``) on a quorum
    queue is refused with 540 NOT_IMPLEMENTED, which closes the whole connection. Issue 16
    reported it as a 4.0 difference; 3.10 does the same. Anything that deletes a queue says
    ``if_unused=False`` (``Channel.queue_delete``'s default), which both accept."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        doomed = await channel.declare_queue(
            "courier-test-doomed", durable=True, arguments={"x-queue-type": "quorum"}
        )
        await channel.declare_queue(
            "courier-test-doomed-2", durable=True, arguments={"x-queue-type": "quorum"}
        )
        with pytest.raises(aiormq.exceptions.AMQPError, match="NOT_IMPLEMENTED"):
            await doomed.delete()  # if_unused=True, if_empty=True
        assert connection.is_closed or channel.is_closed
    finally:
        await connection.close()
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await channel.queue_delete("courier-test-doomed-2", if_unused=False)
        await channel.queue_delete("courier-test-doomed", if_unused=False)
    finally:
        await connection.close()
    assert {q["name"] for q in broker_admin.queues(vhost.name)} == set()
