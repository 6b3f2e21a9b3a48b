"""Fixtures for courier_common's tests, on their own: run from here or from the repository.

The shared broker's vhost and Redis prefix, the private servers and the RabbitMQ 4 node come
from the test kit's plugins (courier_testing: loaded by libs/common/pyproject.toml's pytest
configuration here, by the repository's conftest there); nothing here needs the repository's
tests/ or a service.
A connection to the shared broker, and ``spans``, a private tracer provider for the tracing
tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer

from courier_common.messaging import AmqpConnection
from courier_testing.backing import BrokerAdmin
from courier_testing.private_services import PrivateRabbitMQ


@pytest.fixture
async def connection(amqp_url: str) -> AsyncIterator[AmqpConnection]:
    """A real connection to the shared broker, in this test's own vhost."""
    conn = await AmqpConnection(amqp_url, client_name="courier-tests").connect(timeout=10)
    yield conn
    await conn.close()


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

    The 4.0 node is one private node in a chroot for the session (courier_testing.rabbitmq4);
    each test gets its own vhost there, as on the shared broker. ``broker_admin`` on the right
    is the shared broker's, from courier_testing.fixtures.
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
