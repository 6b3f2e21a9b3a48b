"""The Courier stack on a private Redis Sentinel group (`courier_testing.sentinel`).

Use the fixtures (``sentinel_env``, ``sentinel_fault_stack``, with ``redis_sentinel_group``
from courier_testing.sentinel) by importing them into a test module.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from courier_sinks.http import HttpSink
from courier_sinks.smtp import SmtpSink
from courier_testing.private_services import PrivateRabbitMQ
from courier_testing.sentinel import SERVICE, RedisSentinelGroup
from tests.support.chain import start_chain
from tests.support.faults import FaultStack
from tests.support.processes import ServiceRunner

__all__ = ["sentinel_env", "sentinel_fault_stack"]


@pytest.fixture
def sentinel_env(redis_sentinel_group: RedisSentinelGroup) -> dict[str, str]:
    """The Redis settings every service of `sentinel_fault_stack` gets.

    ``COURIER_REDIS_MIN_REPLICAS`` is left to its default, which Sentinel makes 1: the
    scenarios prove the default. The URL names the first primary only for its db number; the
    services must ask the Sentinels where the primary is (after a failover, that URL is a
    replica or dead).
    """
    return {
        "COURIER_REDIS_SENTINELS": redis_sentinel_group.sentinel_addresses,
        "COURIER_REDIS_SENTINEL_SERVICE": SERVICE,
        "COURIER_REDIS_REPLICA_TIMEOUT_MS": "500",
    }


@pytest.fixture
def sentinel_fault_stack(
    fault_env: dict[str, dict[str, str]],
    fault_amqp_url: str,
    fault_broker: PrivateRabbitMQ,
    redis_sentinel_group: RedisSentinelGroup,
    sentinel_env: dict[str, str],
    services: ServiceRunner,
    smtp_sink: SmtpSink,
    http_sink: HttpSink,
) -> Iterator[FaultStack]:
    """`fault_stack`, with every service on the Sentinel group instead of one Redis.

    ``FaultStack.redis`` is the group's first primary; the group itself is the
    ``redis_sentinel_group`` fixture (the same object in the same test).
    """
    chain = start_chain(
        services,
        amqp_url=fault_amqp_url,
        redis_url=redis_sentinel_group.first_primary.url,
        redis_prefix="courier:",
        smtp_sink=smtp_sink,
        http_sink=http_sink,
        management_url=f"http://guest:guest@127.0.0.1:{fault_broker.management_port}",
        extra_env={"COURIER_AMQP_HEARTBEAT_SECONDS": "5", **sentinel_env},
        service_env=fault_env,
    )
    with httpx.Client(base_url=chain.url("user-service"), timeout=30) as users:
        yield FaultStack(
            broker=fault_broker,
            redis=redis_sentinel_group.first_primary,
            chain=chain,
            smtp=smtp_sink,
            http=http_sink,
            users=users,
        )
