"""Fixtures for courier_common's tests: a real connection and topology in a private vhost, and
a private tracer provider.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from aio_pika.abc import AbstractRobustChannel
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer
from prometheus_client import CollectorRegistry

from courier_common.messaging import AmqpConnection, declare_topology
from courier_common.messaging.topology import DeclaredTopology
from courier_common.metrics import MessagingMetrics
from tests.support.fixtures import BrokerAdmin
from tests.support.messaging import TOPOLOGY
from tests.support.private_services import PrivateRabbitMQ


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


@pytest.fixture
def spans() -> Iterator[tuple[Tracer, InMemorySpanExporter]]:
    """A private provider, so tracing tests neither need nor disturb the global one."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("courier.test"), exporter
    provider.shutdown()


@pytest.fixture(
    params=[
        pytest.param("3.10", id="rabbitmq3.10"),
        # Part of the full matrix (make faults): about two minutes, too long for make test.
        pytest.param("4.0", id="V4-rabbitmq4.0", marks=[pytest.mark.v4, pytest.mark.matrix]),
    ]
)
def broker_admin(request: pytest.FixtureRequest, broker_admin: BrokerAdmin) -> BrokerAdmin:
    """Every test here that needs a broker runs on the shared 3.10 and on RabbitMQ 4.0 (V4).

    The 4.0 node is one private node in a chroot for the session (tests/support/rabbitmq4.py);
    each test gets its own vhost there, as on the shared broker. ``broker_admin`` on the right
    is the shared broker's, from tests/support/fixtures.py.
    """
    if request.param == "3.10":
        return broker_admin
    node: PrivateRabbitMQ = request.getfixturevalue("rabbitmq4_node")
    admins: dict[int, BrokerAdmin] = request.config.stash.setdefault(_ADMINS, {})
    if node.amqp_port not in admins:
        assert node.management_url is not None
        admin = BrokerAdmin(
            node.management_url, amqp_host="127.0.0.1", amqp_port=node.amqp_port, release="4.0"
        )
        admin.check()
        admins[node.amqp_port] = admin
    return admins[node.amqp_port]


_ADMINS = pytest.StashKey[dict[int, BrokerAdmin]]()
