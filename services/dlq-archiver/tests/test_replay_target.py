"""A replay goes back to the queue that failed, never to the other consumers of the event."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aio_pika
import httpx
import pytest
from aio_pika.abc import AbstractQueue

from courier_common.messaging import EVENTS_EXCHANGE, AmqpConnection
from courier_sinks.smtp import SmtpSink
from courier_testing.polling import eventually
from notification_service.routes import USER_EVENTS_QUEUE
from tests.support.archiver import ADMIN, records, wait_records
from tests.support.stack import Stack

BYSTANDER = "courier-test.bystander"


@pytest.fixture
async def bystander(amqp_url: str) -> AsyncIterator[AbstractQueue]:
    """Another service's consumer of every user event (a CRM sync, say), bound like one."""
    connection = await AmqpConnection(amqp_url, client_name="bystander").connect()
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            BYSTANDER, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(await channel.get_exchange(EVENTS_EXCHANGE), routing_key="user.*")
        yield queue
    finally:
        await connection.close()


async def drain(queue: AbstractQueue) -> list[aio_pika.abc.AbstractIncomingMessage]:
    got = []
    while (message := await queue.get(fail=False, timeout=5)) is not None:
        await message.ack()
        got.append(message)
    return got


async def test_a_replay_reaches_the_failed_consumer_only_once_and_bulk_too(
    stack: Stack, archiver: httpx.AsyncClient, smtp_sink: SmtpSink, bystander: AbstractQueue
) -> None:
    # The welcome fails, and fails again on its first replay; the bulk replay then heals it.
    smtp_sink.fail_next(2, 550, "5.1.1 mailbox unavailable")
    await stack.register("ada@example.com")
    [dead] = await wait_records(archiver, 1)
    assert dead["source_queue"] == USER_EVENTS_QUEUE
    published = await drain(bystander)
    assert [m.routing_key for m in published] == ["user.registered"]  # it got the original

    replayed = await archiver.post(f"/v1/dead-letters/{dead['id']}/replay", headers=ADMIN)
    assert replayed.status_code == 202, replayed.text
    items = await wait_records(archiver, 2)
    [again] = [i for i in items if i["id"] != dead["id"]]
    assert again["replay_of"] == dead["id"]
    assert again["source_queue"] == USER_EVENTS_QUEUE
    assert again["original_exchange"] == "courier.events"  # the handler saw the first route
    assert again["original_routing_key"] == "user.registered"

    job = await archiver.post(
        "/v1/dead-letters/replay",
        json={"fingerprint": dead["fingerprint"], "canary": 0, "rate_per_second": 50},
        headers=ADMIN,
    )
    assert job.status_code == 202, job.text

    async def completed() -> bool:
        state = (await archiver.get(f"/v1/replays/{job.json()['id']}")).json()
        return bool(state["status"] == "completed" and state["replayed"] == 1)

    await eventually(completed, what="the bulk replay")
    await eventually(lambda: len(smtp_sink.messages) == 1, what="the replayed welcome")
    await stack.consumed("acked", 1)  # the replayed delivery is settled: nothing of it is left
    # A misrouted copy would be there already: a replay is confirmed once it is in every
    # queue it was routed to, and the job completed only after that.
    assert await drain(bystander) == []
    assert len(smtp_sink.messages) == 1  # the welcome, once
    assert sorted(r["status"] for r in await records(archiver)) == ["replay-failed", "replayed"]


async def test_a_dead_letter_from_an_unknown_queue_is_refused_with_the_reason(
    archiver: httpx.AsyncClient, amqp_url: str
) -> None:
    connection = await AmqpConnection(amqp_url, client_name="test").connect()
    try:
        channel = await connection.channel()
        dlx = await channel.get_exchange("courier.dlx")
        # Dead-lettered by some other publisher straight to the DLX: no queue of origin.
        await dlx.publish(aio_pika.Message(b"{}", message_id="orphan-1"), routing_key="x")
        await dlx.publish(
            aio_pika.Message(
                b"{}",
                message_id="gone-1",
                headers={
                    "x-courier-failure-reason": "no",
                    "x-courier-failure-kind": "permanent",
                    "x-courier-original-queue": "courier-test.deleted-long-ago",
                },
            ),
            routing_key="x",
        )
    finally:
        await connection.close()
    items = {r["message_id"]: r for r in await wait_records(archiver, 2)}
    orphan = await archiver.post(
        f"/v1/dead-letters/{items['orphan-1']['id']}/replay", headers=ADMIN
    )
    assert orphan.status_code == 409
    assert "queue this dead letter failed in is unknown" in orphan.json()["detail"]
    gone = await archiver.post(f"/v1/dead-letters/{items['gone-1']['id']}/replay", headers=ADMIN)
    assert gone.status_code == 409
    assert "courier-test.deleted-long-ago' does not exist" in gone.json()["detail"]
    assert {r["status"] for r in await records(archiver)} == {"dead"}
