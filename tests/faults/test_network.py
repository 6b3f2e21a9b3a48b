"""F11: a bad network between the services and the broker, through a TCP proxy.

Every service reaches the private broker through `TcpProxy` (courier_testing.tcp_proxy),
which resets connections, refuses new ones, adds latency or swallows everything (a
partition) while users register. The management API is reached directly: the test's own
view of the queues stays clear.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from courier_testing.private_services import PrivateRabbitMQ
from courier_testing.tcp_proxy import TcpProxy
from tests.support.faults import FaultStack
from tests.support.load import RegistrationLoad

pytestmark = pytest.mark.fault

#: notification-service's default prefetch: what one broken connection can strand.
PREFETCH = 32
CHANNELS = ("email", "sms")
SERVICES_ON_THE_BROKER = ("notification-service", "dlq-archiver", "user-service")


@pytest.fixture
def proxy(fault_broker: PrivateRabbitMQ) -> Iterator[TcpProxy]:
    with TcpProxy("127.0.0.1", fault_broker.amqp_port) as proxy:
        yield proxy


@pytest.fixture
def fault_amqp_url(proxy: TcpProxy) -> str:
    return f"amqp://guest:guest@127.0.0.1:{proxy.port}/"


def wait_connected(fault_stack: FaultStack, timeout: float = 90) -> None:
    """Until every service says on /readyz that it has its broker connection back."""
    deadline = time.monotonic() + timeout
    states: dict[str, object] = {}
    while time.monotonic() < deadline:
        for name in SERVICES_ON_THE_BROKER:
            try:
                body = httpx.get(f"{fault_stack.chain.url(name)}/readyz", timeout=5).json()
                states[name] = body.get("broker")
            except httpx.HTTPError as exc:
                states[name] = repr(exc)
        if all(state == "connected" for state in states.values()):
            return
        time.sleep(0.5)
    raise AssertionError(f"not every service reconnected: {states}")


@pytest.mark.matrix
def test_f11_connections_reset_during_registrations(
    fault_stack: FaultStack, proxy: TcpProxy
) -> None:
    """Every connection is reset every few seconds; twice, reconnecting is refused a while."""
    ledger = fault_stack.ledger("F11 connection resets during registrations")
    load = RegistrationLoad(ledger, fault_stack.users, channels=CHANNELS, pause=0.02).start()
    load.wait_for(30)
    resets = 0
    for round_ in range(5):
        time.sleep(2)
        resets += proxy.reset_all()
        if round_ % 2:
            proxy.refuse_new()
            time.sleep(2)
            proxy.refuse_new(False)
    recovered_from = time.monotonic()
    wait_connected(fault_stack)
    load.wait_for(len(load.answers) + 30)
    load.stop()
    assert resets >= 5, f"only {resets} connections were reset"
    assert proxy.refused > 0, "no reconnection was refused"
    # Each reset connection may strand up to a prefetch of deliveries on the worker's.
    fault_stack.check(ledger, duplicate_bound=5 * PREFETCH, recovery_started=recovered_from)


@pytest.mark.matrix
def test_f11_latency_during_registrations(fault_stack: FaultStack, proxy: TcpProxy) -> None:
    """50, 100, then 200 ms each way on every chunk: slower, but nothing breaks."""
    ledger = fault_stack.ledger("F11 latency 50-200 ms during registrations")
    load = RegistrationLoad(ledger, fault_stack.users, channels=CHANNELS, pause=0.02).start()
    load.wait_for(20)
    connections = proxy.accepted
    for latency in (0.05, 0.1, 0.2):
        proxy.set_latency(latency)
        load.wait_for(len(load.answers) + 100)
    load.stop()
    # Still delayed: the settling below happens at 200 ms each way.
    fault_stack.check(ledger, duplicate_bound=0)
    proxy.set_latency(0)
    assert proxy.accepted == connections, "latency alone made a service reconnect"


@pytest.mark.matrix
def test_f11_partition_longer_than_the_heartbeat_timeout(
    fault_stack: FaultStack, proxy: TcpProxy
) -> None:
    """No byte either way for 25 s (the heartbeat gives up after ~18 s), then it heals."""
    ledger = fault_stack.ledger("F11 network partition 25 s during registrations")
    load = RegistrationLoad(ledger, fault_stack.users, channels=CHANNELS, pause=0.05).start()
    load.wait_for(30)
    proxy.blackhole()
    try:
        time.sleep(25)
    finally:
        proxy.blackhole(False)
    healed = time.monotonic()
    wait_connected(fault_stack)
    load.wait_for(len(load.answers) + 30)
    load.stop()
    fault_stack.check(ledger, duplicate_bound=PREFETCH, recovery_started=healed)
