"""Ack coalescing: a multiple ack covers only deliveries that are all ready, never one in hand."""

from __future__ import annotations

import asyncio

import aio_pika
from aio_pika.abc import AbstractRobustChannel

from courier_common.messaging import DeliveryLoop, Requeue, WorkQueue, declare_topology
from courier_common.messaging.acks import AckBatcher
from courier_common.messaging.connection import AmqpConnection
from courier_common.messaging.delivery import Delivery
from courier_common.messaging.settlement import Ack, Settlement
from courier_common.messaging.topology import Topology
from courier_testing.polling import eventually, queue_counts, ready_count


class Recorder:
    """Records the ack frames our batcher asks a channel to send (the decision under test)."""

    is_closed = False

    def __init__(self) -> None:
        self.frames: list[tuple[int, bool]] = []

    async def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.frames.append((delivery_tag, multiple))


async def test_a_run_of_ready_acks_is_one_multiple_ack_and_a_tag_in_hand_blocks_it() -> None:
    acks, channel = AckBatcher(), Recorder()
    for tag in range(1, 8):
        acks.delivered(channel, tag)
    # 1-3 ready, 4 still in hand, 5-6 ready, 7 in hand
    await asyncio.gather(*(acks.ack(channel, tag) for tag in (1, 2, 3, 5, 6)))
    assert channel.frames == [(3, True), (5, False), (6, False)]
    # 4 rejected meanwhile: it no longer blocks; 7 acked alone
    acks.released(channel, 4)
    await acks.ack(channel, 7)
    assert channel.frames[-1] == (7, False)


async def test_a_gap_in_the_tags_seen_turns_multiple_off_for_the_channel() -> None:
    acks, channel = AckBatcher(), Recorder()
    for tag in (1, 2, 4, 5):  # 3 was delivered but never announced
        acks.delivered(channel, tag)
    await asyncio.gather(*(acks.ack(channel, tag) for tag in (1, 2, 4, 5)))
    assert all(not multiple for _, multiple in channel.frames)
    assert sorted(tag for tag, _ in channel.frames) == [1, 2, 4, 5]


async def test_a_delivery_in_hand_is_redelivered_after_its_neighbours_were_acked(
    amqp_url: str, channel: AbstractRobustChannel
) -> None:
    queue = WorkQueue(name="courier-test.acks", binding_keys=())
    await declare_topology(channel, Topology(work_queues=(queue,)))
    for n in range(40):
        await channel.default_exchange.publish(
            aio_pika.Message(b"%d" % n, message_id=str(n)), routing_key=queue.name
        )
    release = asyncio.Event()

    seen: list[str] = []

    class Handler:
        async def handle(self, delivery: Delivery) -> Settlement:
            seen.append(delivery.message_id or "")
            if delivery.message_id == "7":  # held while everything around it is acked
                await release.wait()
            return Ack()

        def on_crash(self, delivery: Delivery, exc: Exception) -> Settlement:
            return Requeue(repr(exc))

        def settled(self, delivery: Delivery, settlement: Settlement, seconds: float) -> None:
            pass

    connection = await AmqpConnection(amqp_url, client_name="acks").connect()
    loop = DeliveryLoop(connection=connection, queue=queue, handler=Handler(), prefetch=50)
    await loop.start()
    await eventually(lambda: len(seen) == 40, what="all 40 delivered")
    await eventually(lambda: loop.in_flight == 1, what="39 acked, 7 in hand")
    await loop.stop(timeout=0.1)  # 7 is abandoned unacked
    await connection.close()  # ... and the broker gives it back

    async def given_back() -> bool:  # the broker dropped our consumer and returned its holding
        ready, consumers = await queue_counts(channel, queue.name)
        return consumers == 0 and ready > 0

    await eventually(given_back, what="the held delivery back in the queue")
    # Whatever a closed channel held comes back in one go: one message now is all there is.
    assert await ready_count(channel, queue.name) == 1  # nothing else came back
    back = await (await channel.get_queue(queue.name)).get(timeout=5)
    await back.ack()
    assert back.message_id == "7"
    release.set()
