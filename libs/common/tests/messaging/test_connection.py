"""The connection over a list of nodes, and a broker that refuses us, on real brokers."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import quote

import aio_pika
import pytest

from courier_common.messaging.connection import (
    AmqpConnection,
    NodeRotatingConnection,
    broker_refusal,
    redact_url,
    split_amqp_urls,
)
from courier_testing.backing import BrokerAdmin, BrokerVhost
from courier_testing.polling import eventually
from courier_testing.private_services import PrivateRabbitMQ


def events(out: str, name: str) -> list[dict[str, Any]]:
    found = []
    for line in out.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == name:
            found.append(record)
    return found


def test_the_url_list_is_split_and_redacted() -> None:
    value = " amqp://u:pw1@a:5672/v , amqp://u:pw1@b:5672/v,"
    assert split_amqp_urls(value) == ("amqp://u:pw1@a:5672/v", "amqp://u:pw1@b:5672/v")
    assert redact_url(value.strip(" ,")) == "amqp://u:***@a:5672/v,amqp://u:***@b:5672/v"
    with pytest.raises(ValueError, match="no AMQP URL"):
        split_amqp_urls(" , ")


async def test_the_first_node_that_answers_is_used(
    vhost: BrokerVhost, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = f"amqp://guest:sekrit-pw@127.0.0.1:1/{quote(vhost.name, safe='')}"
    connection = AmqpConnection(f"{dead},{vhost.amqp_url}", client_name="courier-tests")
    await connection.connect(timeout=20)
    try:
        assert connection.url == vhost.amqp_url
        assert connection.is_connected
        assert connection.problem is None
        channel = await connection.channel()
        queue = await channel.declare_queue("", exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"hi"), routing_key=queue.name)
        assert (await queue.get(timeout=5)).body == b"hi"
    finally:
        await connection.close()
    out = capsys.readouterr().out
    assert "sekrit-pw" not in out
    assert events(out, "amqp_connected")[-1]["url"] == redact_url(vhost.amqp_url)


async def test_every_node_down_is_an_error_naming_them_without_passwords() -> None:
    connection = AmqpConnection(
        "amqp://guest:sekrit-pw@127.0.0.1:1/,amqp://guest:sekrit-pw@127.0.0.1:2/",
        client_name="courier-tests",
    )
    with pytest.raises(ConnectionError) as info:
        await connection.connect(timeout=1)
    assert "sekrit-pw" not in str(info.value)
    assert "cannot reach amqp://guest:***@127.0.0.1:" in str(info.value)
    assert not connection.refused


async def test_an_unknown_vhost_is_one_critical_line_then_retried_until_it_exists(
    broker_admin: BrokerAdmin,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The broker's refusal is configuration: said once, loudly; the operator may fix it."""
    attempts: list[str] = []
    attempt = NodeRotatingConnection.connect

    async def counted(self: NodeRotatingConnection, *args: Any, **kwargs: Any) -> None:
        attempts.append(str(self.url))
        await attempt(self, *args, **kwargs)

    monkeypatch.setattr(NodeRotatingConnection, "connect", counted)
    name = f"courier-test-{id(capsys)}-late"
    url = broker_admin.vhost(name).amqp_url
    broker_admin.delete_vhost(name)
    connection = AmqpConnection(url, client_name="courier-tests")
    connecting = asyncio.create_task(connection.connect(timeout=None))
    try:
        await eventually(lambda: connection.refused, timeout=10, what="the refusal")
        problem = connection.problem or ""
        assert f"vhost {name} not found" in problem or f"vhost '{name}' not found" in problem
        await eventually(lambda: len(attempts) >= 4, what="three more attempts, all refused")
        assert not connecting.done()
        broker_admin.create_vhost(name)  # what the operator does
        await asyncio.wait_for(connecting, 30)
        assert connection.is_connected
        assert connection.problem is None
    finally:
        connecting.cancel()
        await connection.close()
        broker_admin.delete_vhost(name)
    out = capsys.readouterr().out
    critical = events(out, "amqp_refused")
    assert len(critical) == 1, critical
    assert critical[0]["level"] == "critical"
    assert critical[0]["vhost"] == name
    assert "NOT_ALLOWED" in critical[0]["broker_reply"]
    assert critical[0]["url"] == redact_url(url)
    # Warnings at a bounded rate: the first failure, then at most one every 30 s.
    assert len(events(out, "amqp_connect_failed")) == 1


async def test_wrong_credentials_are_a_refusal_with_the_brokers_reply(
    vhost: BrokerVhost,
) -> None:
    url = vhost.amqp_url.replace("guest:guest@", "guest:wrong-pw@", 1)
    connection = AmqpConnection(url, client_name="courier-tests")
    with pytest.raises(ConnectionError) as info:
        await connection.connect(timeout=1)
    assert connection.refused
    assert "ACCESS_REFUSED" in str(info.value)
    assert "wrong-pw" not in str(info.value)
    assert broker_refusal(info.value.__cause__ or info.value) is not None


@pytest.mark.fault
async def test_a_reconnect_goes_to_the_next_node_when_this_one_dies(
    private_rabbitmq: PrivateRabbitMQ, vhost: BrokerVhost, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two brokers standing in for two nodes: the private one dies, the shared one takes over.

    aio-pika alone would retry the dead node's URL forever; the rotation moves on, and the
    robust channel's queue and consumer come back on the other node.
    """
    private = private_rabbitmq.url.rstrip("/") + "/"
    connection = AmqpConnection(
        f"{private},{vhost.amqp_url}",
        client_name="courier-tests",
        heartbeat=2,
        reconnect_interval=0.3,
    )
    await connection.connect(timeout=20)
    try:
        assert connection.url == private
        channel = await connection.channel()
        queue = await channel.declare_queue("courier-test-rotation", auto_delete=True)
        got: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            await got.put(message.body)

        await queue.consume(on_message)
        await asyncio.to_thread(private_rabbitmq.kill)
        await eventually(
            lambda: connection.is_connected and connection.url == vhost.amqp_url,
            timeout=30,
            what="the reconnect to the next node",
        )
        # The robust channel re-declared the queue and the consumer there.
        await eventually(
            lambda: bool(broker_admin_queue_consumers(vhost, "courier-test-rotation")),
            timeout=15,
            what="the consumer restored on the next node",
        )
        await channel.default_exchange.publish(
            aio_pika.Message(b"after"), routing_key="courier-test-rotation"
        )
        assert await asyncio.wait_for(got.get(), 10) == b"after"
    finally:
        await connection.close()
    out = capsys.readouterr().out
    assert events(out, "amqp_reconnected")[-1]["url"] == redact_url(vhost.amqp_url)


def broker_admin_queue_consumers(vhost: BrokerVhost, queue: str) -> int:
    admin = BrokerAdmin(vhost.management)
    try:
        response = admin.client.get(
            f"/api/queues/{quote(vhost.name, safe='')}/{quote(queue, safe='')}"
        )
        return int(response.json().get("consumers") or 0) if response.status_code == 200 else 0
    finally:
        admin.client.close()
