"""The notifier with user-service, RabbitMQ, Redis and the two sinks, all real."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

import notification_service.main
import user_service.main
from courier_sinks.http import HttpSink
from courier_sinks.smtp import SmtpSink
from notification_service.config import Settings as NotifierSettings
from tests.support.helpers import eventually
from tests.support.stack import Stack
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
        retry_delays_seconds=RETRY_DELAYS,
        retry_max_attempts=MAX_ATTEMPTS,
    )


@pytest.fixture
async def stack(
    notifier_settings: NotifierSettings, user_settings: UserSettings
) -> AsyncIterator[Stack]:
    notifier_app = notification_service.main.create_app(notifier_settings)
    user_app = user_service.main.create_app(user_settings)
    async with (
        LifespanManager(notifier_app, startup_timeout=30, shutdown_timeout=30) as notifier,
        LifespanManager(user_app, startup_timeout=30) as users,
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
