"""Queue depth from the broker: ready and unacked messages and consumers, as gauges."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from aio_pika.abc import AbstractRobustChannel

from courier_common.messaging import Publisher, new_event
from courier_common.messaging.backlog import BacklogMonitor, ManagementClient, QueueDepth
from courier_common.messaging.topology import DeclaredTopology
from courier_common.metrics import MessagingMetrics
from courier_testing.backing import BrokerVhost
from courier_testing.events import Pinged
from courier_testing.polling import eventually

from .support import WORK


async def test_backlog_reports_ready_and_unacked(
    declared: DeclaredTopology,
    channel: AbstractRobustChannel,
    metrics: MessagingMetrics,
    vhost: BrokerVhost,
) -> None:
    publisher = Publisher(channel)
    for n in range(5):
        await publisher.publish_event(new_event(Pinged(n=n), source="t"))
    holder = await channel.declare_queue(WORK.name, passive=True)
    held = [await holder.get(no_ack=False) for _ in range(2)]  # 2 unacked, 3 ready

    monitor = BacklogMonitor(
        ManagementClient(vhost.management_url),
        vhost=vhost.name,
        queues=[WORK.name],
        metrics=metrics,
        interval=0.5,
    )
    await monitor.start()

    def gauge(state: str) -> float:
        value: float = metrics.queue_messages.labels(WORK.name, state)._value.get()
        return value

    try:
        # The management API's statistics refresh every few seconds.
        await eventually(
            lambda: (gauge("ready"), gauge("unacked")) == (3, 2),
            timeout=30,
            interval=0.2,
            what="ready=3 unacked=2",
        )
    finally:
        await monitor.stop()
        for message in held:
            await message.ack()
    await asyncio.sleep(0)


async def test_an_unreachable_management_api_is_reported_not_raised(
    metrics: MessagingMetrics,
) -> None:
    class CountingClient(ManagementClient):
        """Nothing listens on port 9: every poll fails; this counts them."""

        polls = 0

        async def queue_depth(self, vhost: str, queue: str) -> QueueDepth:
            self.polls += 1
            return await super().queue_depth(vhost, queue)

    client = CountingClient("http://guest:guest@127.0.0.1:9")
    monitor = BacklogMonitor(client, vhost="/", queues=[WORK.name], metrics=metrics, interval=0.05)
    await monitor.start()
    await eventually(lambda: client.polls >= 3, what="three failed polls")  # it lived on
    assert monitor._task is not None
    assert not monitor._task.done()
    await monitor.stop()


async def test_the_next_management_url_answers_when_the_first_node_is_down(
    declared: DeclaredTopology, vhost: BrokerVhost
) -> None:
    """One URL per node: a dead node moves the client on, and it stays on the live one."""
    client = ManagementClient(f"http://guest:guest@127.0.0.1:9,{vhost.management_url}")
    try:
        depth = await client.queue_depth(vhost.name, WORK.name)
        assert (depth.name, depth.ready) == (WORK.name, 0)
        assert client.base_url == vhost.management  # and it stays on the node that answered
        assert (await client.queue_depth(vhost.name, WORK.name)).name == WORK.name
    finally:
        await client.aclose()
    # A 404 is an answer (the same on every node), not a reason to try another.
    client = ManagementClient([vhost.management_url, "http://guest:guest@127.0.0.1:9"])
    try:
        with pytest.raises(httpx.HTTPStatusError, match="404"):
            await client.queue_depth(vhost.name, "no-such-queue")
    finally:
        await client.aclose()
