"""Fixtures for the outbox's tests: a stream of their own, a writer, relays that stop after."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio
from prometheus_client import CollectorRegistry

from courier_common.messaging import AmqpConnection, EventData, Topology
from courier_common.metrics import MessagingMetrics
from courier_common.outbox import Outbox, OutboxMetrics, OutboxRelay, stream_key

#: The CloudEvents source of the test events.
SOURCE = "urn:courier:outbox-test"


@pytest.fixture
def stream(redis_prefix: str) -> str:
    return stream_key(redis_prefix, "outbox-test")


@pytest.fixture
def outbox(redis_client: redis.asyncio.Redis, stream: str) -> Outbox:
    return Outbox(redis_client, stream=stream, source=SOURCE)


@pytest.fixture
def emit(outbox: Outbox) -> Callable[[EventData], Awaitable[Any]]:
    """Queue one event, as a service's script does when the event is all it writes."""
    script = outbox.script("emit_outbox()\nreturn 'ok'")

    async def emit(data: EventData) -> Any:
        keys, args = outbox.with_event(data, keys=[], args=[])
        return await script(keys=keys, args=args)

    return emit


@pytest.fixture
async def start_relay(
    redis_client: redis.asyncio.Redis, stream: str
) -> AsyncIterator[Callable[..., Awaitable[OutboxRelay]]]:
    """Start a relay on ``stream`` (the platform topology, short timings); stopped afterwards.

    Keyword arguments override the relay's (``redis``, ``metrics``, ``durability``, ...).
    """
    running: list[tuple[OutboxRelay, asyncio.Task[None]]] = []

    async def start(amqp_url: str, **overrides: Any) -> OutboxRelay:
        registry = CollectorRegistry()
        options: dict[str, Any] = {
            "redis": redis_client,
            "stream": stream,
            "topology": Topology(),
            "metrics": OutboxMetrics(registry),
            "messaging_metrics": MessagingMetrics(registry),
            "block_ms": 100,
            "claim_idle_ms": 1000,
            "retry_max_seconds": 0.5,
            **overrides,
        }
        relay = OutboxRelay(
            connection=AmqpConnection(amqp_url, client_name="outbox-test", heartbeat=2),
            **options,
        )
        running.append((relay, asyncio.create_task(relay.run())))
        return relay

    yield start
    for relay, task in running:
        relay.stop()
        try:
            await asyncio.wait_for(task, 10)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await relay.connection.close()
