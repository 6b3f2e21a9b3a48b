"""Pytest fixtures on the shared RabbitMQ and Redis: a vhost and a key prefix per test.

Every test gets its own vhost (so it can use Courier's real queue names) and its own Redis
key prefix, and both are removed afterwards. Vhosts left by a crashed run are swept at the
start of the next one. A missing broker or Redis is a failure, never a skip: a suite that
skips its broker tests proves nothing. Loaded as a plugin (``pytest_plugins``) by the
repository's conftest and by the library's.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio

from courier_common.logging import configure_logging
from courier_common.tracing import init_tracing, shutdown_tracing
from courier_testing.backing import REDIS_URL, BrokerAdmin, BrokerVhost, delete_prefix

VHOST_PREFIX = "courier-test-"

_RUN_ID = f"{os.getpid()}-{secrets.token_hex(3)}"
_counter = itertools.count(1)


@pytest.fixture(scope="session")
def broker_admin() -> Iterator[BrokerAdmin]:
    admin = BrokerAdmin()
    admin.check()
    admin.sweep_stale(VHOST_PREFIX)
    yield admin
    admin.close()


@pytest.fixture
def vhost(broker_admin: BrokerAdmin) -> Iterator[BrokerVhost]:
    """A fresh vhost on the shared broker, deleted (with all its queues) after the test."""
    name = f"{VHOST_PREFIX}{_RUN_ID}-{next(_counter)}"
    broker_admin.create_vhost(name)
    try:
        yield broker_admin.vhost(name)
    finally:
        broker_admin.delete_vhost(name)


@pytest.fixture
def amqp_url(vhost: BrokerVhost) -> str:
    return vhost.amqp_url


@pytest.fixture(scope="session")
def _redis_reachable() -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(
            f"Redis is not reachable at {REDIS_URL} ({exc!r}). Run `make test` (it starts "
            "Redis), or start redis-server.",
            pytrace=False,
        )
    finally:
        client.close()


@pytest.fixture
def redis_prefix(_redis_reachable: None) -> Iterator[str]:
    """A key prefix owned by one test; every key under it is deleted afterwards."""
    prefix = f"courier-test:{_RUN_ID}:{next(_counter)}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    try:
        delete_prefix(client, prefix)
    finally:
        client.close()


@pytest.fixture
def redis_url(_redis_reachable: None) -> str:
    return REDIS_URL


@pytest.fixture
async def redis_client(redis_prefix: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture(scope="session", autouse=True)
def _tracer_provider() -> Iterator[None]:
    """A real (SDK) tracer provider, as every service installs one: spans get ids, so trace
    context flows through HTTP, the outbox and AMQP headers in tests too. No exporter."""
    os.environ.setdefault("OTEL_TRACES_EXPORTER", "none")
    # The services' own logging set-up (JSON lines, PII scrubbed), not structlog's defaults,
    # whose pretty tracebacks take long enough to look like a hang under load.
    configure_logging(level="INFO", fmt="json", service="courier-tests")
    provider = init_tracing("courier-tests")
    yield
    shutdown_tracing(provider)
