"""Fixtures for the messaging tests: a real connection, and their topology declared on it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aio_pika.abc import AbstractRobustChannel
from prometheus_client import CollectorRegistry

from courier_common.messaging import AmqpConnection, declare_topology
from courier_common.messaging.topology import DeclaredTopology
from courier_common.metrics import MessagingMetrics

from .support import TOPOLOGY


@pytest.fixture
async def connection(amqp_url: str) -> AsyncIterator[AmqpConnection]:
    conn = await AmqpConnection(amqp_url, client_name="courier-tests").connect(timeout=10)
    yield conn
    await conn.close()


@pytest.fixture
async def declared(connection: AmqpConnection) -> DeclaredTopology:
    channel = await connection.channel()
    return await declare_topology(channel, TOPOLOGY)


@pytest.fixture
async def channel(connection: AmqpConnection) -> AbstractRobustChannel:
    return await connection.channel()


@pytest.fixture
def metrics() -> MessagingMetrics:
    return MessagingMetrics(CollectorRegistry())
