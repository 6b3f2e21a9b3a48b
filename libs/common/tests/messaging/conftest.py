"""Fixtures for the messaging tests: their topology declared on the connection, a channel."""

from __future__ import annotations

import pytest
from aio_pika.abc import AbstractRobustChannel
from prometheus_client import CollectorRegistry

from courier_common.messaging import AmqpConnection, declare_topology
from courier_common.messaging.topology import DeclaredTopology
from courier_common.metrics import MessagingMetrics

from .support import TOPOLOGY


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
