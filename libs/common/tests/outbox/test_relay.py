"""The relay: entries become confirmed messages, a refusal is retried, replicas come first."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import pytest
import redis.asyncio
import structlog
from opentelemetry import trace
from prometheus_client import CollectorRegistry

from courier_common.messaging import AmqpConnection, EventData
from courier_common.outbox import Outbox, OutboxMetrics, OutboxRelay
from courier_common.redis import Durability
from courier_testing.events import EventTap, Pinged
from courier_testing.polling import eventually
from courier_testing.private_services import PrivateRedis

Emit = Callable[[EventData], Awaitable[Any]]
StartRelay = Callable[..., Awaitable[OutboxRelay]]
TRACEPARENT = re.compile(r"^00-(?P<trace>[0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


@pytest.fixture
async def tap(amqp_url: str) -> AsyncIterator[EventTap]:
    """A queue of the test's own bound to the test events on ``courier.events``."""
    connection = await AmqpConnection(amqp_url, client_name="tap").connect()
    channel = await connection.channel()
    exchange = await channel.declare_exchange(
        "courier.events", aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue("outbox-test.tap", exclusive=True)
    await queue.bind(exchange, "test.*")
    yield EventTap(channel, queue)
    await connection.close()


async def test_each_entry_is_published_as_its_event_and_then_deleted(
    amqp_url: str,
    tap: EventTap,
    emit: Emit,
    start_relay: StartRelay,
    redis_client: redis.asyncio.Redis,
    stream: str,
) -> None:
    with trace.get_tracer("outbox-test").start_as_current_span("change") as span:
        for n in range(3):
            await emit(Pinged(n=n))
    reply: Any = await redis_client.xrange(stream)
    written: list[dict[bytes, bytes]] = [fields for _, fields in reply]
    registry = CollectorRegistry()
    await start_relay(amqp_url, metrics=OutboxMetrics(registry))

    messages = await tap.collect(3)
    assert [m.body for m in messages] == [fields[b"event"] for fields in written]
    trace_id = format(span.get_span_context().trace_id, "032x")
    for message, fields in zip(messages, written, strict=True):
        assert message.message_id == fields[b"event_id"].decode() == json.loads(message.body)["id"]
        assert message.routing_key == message.type == "test.pinged"
        assert message.content_type == "application/json"
        assert message.delivery_mode == 2
        # The change's trace continues through the outbox into the message.
        traceparent = TRACEPARENT.match(str(message.headers["traceparent"]))
        assert traceparent is not None
        assert traceparent["trace"] == trace_id

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    async def drained() -> bool:
        # The gauges are refreshed every 2 s; the names are what dashboards and alerts query.
        return (
            await redis_client.xlen(stream) == 0
            and sample("courier_outbox_relayed_total", outcome="published") == 3
            and sample("courier_outbox_backlog") == 0
            and sample("courier_outbox_oldest_age_seconds") == 0
        )

    await eventually(drained, timeout=10, what="the outbox drained and its gauges at zero")
    assert sample("courier_outbox_relayed_total", outcome="failed") is None  # never failed


async def test_a_refused_batch_is_retried_on_a_new_channel_until_it_gets_through(
    amqp_url: str,
    emit: Emit,
    start_relay: StartRelay,
    redis_client: redis.asyncio.Redis,
    stream: str,
) -> None:
    # The only queue bound to test.*, over its length limit, so refusing publishes.
    connection = await AmqpConnection(amqp_url, client_name="test").connect()
    channel = await connection.channel()
    exchange = await channel.declare_exchange(
        "courier.events", aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(
        "outbox-test.capped",
        durable=True,
        arguments={"x-queue-type": "quorum", "x-max-length": 1, "x-overflow": "reject-publish"},
    )
    await queue.bind(exchange, "test.*")
    # A quorum queue applies its limit once it is over it: two fillers put it in that state.
    for _ in range(2):
        await channel.default_exchange.publish(aio_pika.Message(b"filler"), routing_key=queue.name)
    try:
        with structlog.testing.capture_logs() as logs:
            await emit(Pinged(n=1, note="b"))
            relay = await start_relay(amqp_url)

            def renewed() -> bool:
                return any(line["event"] == "outbox_channel_renewed" for line in logs)

            await eventually(renewed, timeout=20, what="the relay to renew its channel")
            assert await redis_client.xlen(stream) == 1  # b, kept

            await queue.purge()

            async def drained() -> bool:
                return bool(await redis_client.xlen(stream) == 0)

            await eventually(drained, timeout=20, what="b published once there is room")
            relay.stop()
        refused = [line for line in logs if line["event"] == "outbox_publish_failed"]
        assert refused
        assert all("refused" in line["error"] for line in refused)
        message = await queue.get(timeout=5)
        body = json.loads(message.body)  # the filler was purged: this is b's event
        assert body["data"] == {"n": 1, "note": "b"}
    finally:
        await connection.close()


@pytest.fixture
async def lonely_client(private_redis: PrivateRedis) -> AsyncIterator[redis.asyncio.Redis]:
    """A client of a primary nobody replicates: WAIT 1 can never be satisfied."""
    client = redis.asyncio.Redis.from_url(private_redis.url)
    yield client
    await client.aclose()


@pytest.mark.fault
async def test_the_relay_publishes_nothing_its_replicas_have_not_confirmed(
    amqp_url: str,
    tap: EventTap,
    lonely_client: redis.asyncio.Redis,
    start_relay: StartRelay,
    stream: str,
) -> None:
    # A change answered 503 (its replicas were late) is on a primary a failover may yet
    # replace without it: its event must not go out before a replica has it.
    outbox = Outbox(lonely_client, stream=stream, source="urn:courier:outbox-test")
    keys, args = outbox.with_event(Pinged(n=1), keys=[], args=[])
    await outbox.script("emit_outbox()")(keys=keys, args=args)
    with structlog.testing.capture_logs() as logs:
        relay = await start_relay(
            amqp_url, redis=lonely_client, durability=Durability(min_replicas=1, timeout_ms=50)
        )
        await asyncio.sleep(1.5)  # several relay rounds (block_ms=100)
        relay.stop()
    assert await tap.queue.get(no_ack=True, fail=False) is None
    assert await lonely_client.xlen(stream) == 1, "kept, not published"
    assert any(
        line["event"] == "outbox_redis_error" and "NotReplicatedError" in line["error"]
        for line in logs
    )
