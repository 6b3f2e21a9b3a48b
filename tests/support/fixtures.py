"""Pytest fixtures on the shared RabbitMQ and Redis: a vhost and a key prefix per test.

Every test gets its own vhost (so it can use Courier's real queue names) and its own Redis
key prefix, and both are removed afterwards. Vhosts left by a crashed run are swept at the
start of the next one. A missing broker or Redis is a failure, never a skip: a suite that
skips its broker tests proves nothing.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from urllib.parse import quote

import aio_pika
import httpx
import pytest
import redis
import redis.asyncio

from courier_common.logging import configure_logging
from courier_common.messaging import AmqpConnection
from courier_common.tracing import init_tracing, shutdown_tracing
from tests.support.helpers import EventTap

AMQP_HOST = os.environ.get("COURIER_TEST_AMQP_HOST", "127.0.0.1")
AMQP_PORT = int(os.environ.get("COURIER_TEST_AMQP_PORT", "5672"))
MANAGEMENT_URL = os.environ.get("COURIER_TEST_MANAGEMENT_URL", f"http://{AMQP_HOST}:15672")
REDIS_URL = os.environ.get("COURIER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
USER, PASSWORD = "guest", "guest"
VHOST_PREFIX = "courier-test-"

_RUN_ID = f"{os.getpid()}-{secrets.token_hex(3)}"
_counter = itertools.count(1)


@dataclass(frozen=True)
class BrokerVhost:
    """A vhost on the shared broker (or another broker, see `BrokerAdmin`) for one test."""

    name: str
    amqp_host: str = AMQP_HOST
    amqp_port: int = AMQP_PORT
    management: str = MANAGEMENT_URL

    @property
    def amqp_url(self) -> str:
        vhost = quote(self.name, safe="")
        return f"amqp://{USER}:{PASSWORD}@{self.amqp_host}:{self.amqp_port}/{vhost}"

    @property
    def management_url(self) -> str:
        return self.management.replace("://", f"://{USER}:{PASSWORD}@", 1)


class BrokerAdmin:
    """Management API calls the tests need (synchronous: used from fixtures).

    The shared broker's by default; *management_url* and *amqp_port* point it at another
    (the RabbitMQ 4 node of the V4 runs).
    """

    def __init__(
        self,
        management_url: str = MANAGEMENT_URL,
        *,
        amqp_host: str = AMQP_HOST,
        amqp_port: int = AMQP_PORT,
        release: str = "3.10",
    ) -> None:
        self.management_url = management_url
        self.amqp_host = amqp_host
        self.amqp_port = amqp_port
        self.release = release
        self.client = httpx.Client(base_url=management_url, auth=(USER, PASSWORD), timeout=30)

    def vhost(self, name: str) -> BrokerVhost:
        """A handle on vhost *name* of this broker (not created here)."""
        return BrokerVhost(name, self.amqp_host, self.amqp_port, self.management_url)

    def check(self) -> None:
        try:
            self.client.get("/api/overview").raise_for_status()
        except httpx.HTTPError as exc:
            pytest.fail(
                f"RabbitMQ management API is not reachable at {self.management_url} "
                f"({exc!r}). "
                "Run `make test` (it starts RabbitMQ and enables rabbitmq_management), or "
                "`rabbitmq-plugins enable rabbitmq_management rabbitmq_prometheus`.",
                pytrace=False,
            )

    def create_vhost(self, name: str) -> None:
        vhost = quote(name, safe="")
        self.client.put(f"/api/vhosts/{vhost}").raise_for_status()
        self.client.put(
            f"/api/permissions/{vhost}/{USER}",
            json={"configure": ".*", "write": ".*", "read": ".*"},
        ).raise_for_status()

    def delete_vhost(self, name: str) -> None:
        response = self.client.delete(f"/api/vhosts/{quote(name, safe='')}")
        if response.status_code not in (204, 404):
            response.raise_for_status()

    def vhosts(self) -> list[str]:
        return [v["name"] for v in self.client.get("/api/vhosts").json()]

    def queue(self, vhost: str, name: str) -> dict[str, object]:
        response = self.client.get(f"/api/queues/{quote(vhost, safe='')}/{quote(name, safe='')}")
        response.raise_for_status()
        result: dict[str, object] = response.json()
        return result

    def queues(self, vhost: str) -> list[dict[str, object]]:
        response = self.client.get(f"/api/queues/{quote(vhost, safe='')}")
        response.raise_for_status()
        result: list[dict[str, object]] = response.json()
        return result

    def sweep_stale(self) -> None:
        """Delete test vhosts whose creating process is gone (a crashed earlier run)."""
        for name in self.vhosts():
            if not name.startswith(VHOST_PREFIX):
                continue
            pid = name[len(VHOST_PREFIX) :].split("-", 1)[0]
            if pid.isdigit() and not alive(int(pid)):
                self.delete_vhost(name)


def alive(pid: int) -> bool:
    """Does a process with this pid exist (as far as this user can tell)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="session")
def broker_admin() -> Iterator[BrokerAdmin]:
    admin = BrokerAdmin()
    admin.check()
    admin.sweep_stale()
    yield admin
    admin.client.close()


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
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
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


@pytest.fixture
async def event_tap(amqp_url: str) -> AsyncIterator[EventTap]:
    connection = await AmqpConnection(amqp_url, client_name="tap").connect()
    channel = await connection.channel()
    exchange = await channel.declare_exchange(
        "courier.events", aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue("test.tap", exclusive=True)
    await queue.bind(exchange, "user.*")
    yield EventTap(channel, queue)
    await connection.close()
