"""The running Courier stack as tests drive it: sinks, settings, in-process apps, metrics.

Loaded as a pytest plugin by the root conftest, so every test folder can use the fixtures.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import httpx
import pytest
from asgi_lifespan import LifespanManager

import notification_service.main
import user_service.main
from courier_common.messaging import AmqpConnection
from courier_sinks.http import HttpSink
from courier_sinks.smtp import SmtpSink
from courier_testing.env import backing_env
from courier_testing.events import EventTap
from courier_testing.metrics import sample
from courier_testing.polling import eventually
from notification_service.config import Settings as NotifierSettings
from notification_service.routes import USER_EVENTS_QUEUE
from user_service.config import Settings as UserSettings

#: Short retry tiers with the production shape; every service must share them.
RETRY_DELAYS = [0.3, 0.6, 1.2]
MAX_ATTEMPTS = 4


@pytest.fixture
def smtp_sink(tmp_path: Path) -> Iterator[SmtpSink]:
    with SmtpSink(store_path=tmp_path / "smtp.jsonl") as sink:
        yield sink


@pytest.fixture
def http_sink(tmp_path: Path) -> Iterator[HttpSink]:
    with HttpSink(store_path=tmp_path / "http.jsonl", token="sink-token") as sink:
        yield sink


@pytest.fixture
def notifier_settings(
    amqp_url: str, redis_url: str, redis_prefix: str, smtp_sink: SmtpSink, http_sink: HttpSink
) -> NotifierSettings:
    return NotifierSettings(
        amqp_url=amqp_url,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        environment="test",
        smtp_port=smtp_sink.port,
        sms_url=f"{http_sink.url}/sms",
        push_url=f"{http_sink.url}/push",
        sms_token="sink-token",
        push_token="sink-token",
        idempotency_lease_seconds=5,
        backlog_poll_seconds=1,
        drain_timeout_seconds=10,
        retry_delays_seconds=RETRY_DELAYS,
        retry_max_attempts=MAX_ATTEMPTS,
    )


@pytest.fixture
def user_settings(amqp_url: str, redis_url: str, redis_prefix: str) -> UserSettings:
    return UserSettings(
        amqp_url=amqp_url,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        environment="test",
        outbox_block_ms=50,
    )


@pytest.fixture
async def stack(
    notifier_settings: NotifierSettings, user_settings: UserSettings
) -> AsyncIterator[Stack]:
    notifier_app = notification_service.main.create_app(notifier_settings)
    user_app = user_service.main.create_app(user_settings)
    async with (
        LifespanManager(notifier_app, startup_timeout=30, shutdown_timeout=30) as notifier,
        LifespanManager(user_app, startup_timeout=30, shutdown_timeout=30) as users,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=users.app), base_url="http://users"
        ) as user_client,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=notifier.app), base_url="http://notifier"
        ) as notifier_client,
    ):
        stack = Stack(users=user_client, notifier=notifier_client)

        async def ready() -> bool:
            return (await notifier_client.get("/readyz")).status_code == 200

        await eventually(ready, timeout=30, what="the notifier to consume")
        yield stack


@pytest.fixture
async def event_tap(amqp_url: str) -> AsyncIterator[EventTap]:
    """What user-service emits on ``courier.events`` (``user.*``), in a queue of the test's."""
    connection = await AmqpConnection(amqp_url, client_name="tap").connect()
    channel = await connection.channel()
    exchange = await channel.declare_exchange(
        "courier.events", aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue("test.tap", exclusive=True)
    await queue.bind(exchange, "user.*")
    yield EventTap(channel, queue)
    await connection.close()


def service_env(settings: NotifierSettings | UserSettings) -> dict[str, str]:
    """The same settings as environment variables, for a service run as a process."""
    env = backing_env(settings.amqp_url, settings.redis_url, settings.redis_prefix)
    if isinstance(settings, NotifierSettings):
        env |= {
            "COURIER_RETRY_DELAYS_SECONDS": str(settings.retry_delays_seconds),
            "COURIER_RETRY_MAX_ATTEMPTS": str(settings.retry_max_attempts),
            "COURIER_SMTP_PORT": str(settings.smtp_port),
            "COURIER_SMS_URL": settings.sms_url,
            "COURIER_PUSH_URL": settings.push_url,
            "COURIER_SMS_TOKEN": settings.sms_token.get_secret_value(),
            "COURIER_PUSH_TOKEN": settings.push_token.get_secret_value(),
            "COURIER_IDEMPOTENCY_LEASE_SECONDS": str(settings.idempotency_lease_seconds),
        }
    else:
        env["COURIER_OUTBOX_BLOCK_MS"] = str(settings.outbox_block_ms)
    return env


@dataclass
class Stack:
    """user-service and notification-service in this process; ``users`` is the API client."""

    users: httpx.AsyncClient
    notifier: httpx.AsyncClient

    async def register(self, email: str, **extra: object) -> dict[str, object]:
        body = {"email": email, "display_name": "Ada", "locale": "en", **extra}
        response = await self.users.post("/v1/users", json=body)
        assert response.status_code == 201, response.text
        user: dict[str, object] = response.json()
        return user

    async def metric(self, name: str, **labels: str) -> float:
        """A sample from the notifier's /metrics (0 when the series does not exist yet)."""
        return sample((await self.notifier.get("/metrics")).text, name, **labels)

    async def consumed(self, outcome: str, count: int, event_type: str = "user.registered") -> None:
        """Until the notifier has settled *count* deliveries of *event_type* with *outcome*.

        Counted once the settlement is applied: after the last of them nothing about those
        deliveries can happen any more, so what a test asserts next is final, not just early.
        """

        async def settled() -> bool:
            value = await self.metric(
                "courier_messages_consumed_total",
                queue=USER_EVENTS_QUEUE,
                event_type=event_type,
                outcome=outcome,
            )
            return value == count

        await eventually(settled, timeout=20, what=f"{count} {event_type} {outcome}")
