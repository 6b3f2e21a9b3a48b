"""The archiver in-process for tests, and helpers to read its archive.

Loaded as a pytest plugin by the root conftest."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from courier_testing.polling import eventually
from dlq_archiver.config import Settings
from dlq_archiver.main import create_app

ADMIN_TOKEN = "test-admin-token-0123456789"


@pytest.fixture
def archiver_settings(amqp_url: str, redis_url: str, redis_prefix: str) -> Settings:
    return Settings(
        amqp_url=amqp_url,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        environment="test",
        admin_token=ADMIN_TOKEN,
        retry_delays_seconds=[0.3, 0.6, 1.2],
        retry_max_attempts=4,
        replay_canary_wait_seconds=5,
        gauges_interval_seconds=0.5,
    )


@pytest.fixture
async def archiver(archiver_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An API client on a running archiver (consuming once this yields)."""
    app = create_app(archiver_settings)
    async with (
        LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://archiver"
        ) as client,
    ):

        async def ready() -> bool:
            return (await client.get("/readyz")).status_code == 200

        await eventually(ready, timeout=30, what="the archiver to consume")
        yield client


ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def records(archiver: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    response = await archiver.get("/v1/dead-letters", params={"limit": 500, **params})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def wait_records(
    archiver: httpx.AsyncClient, count: int, *, timeout: float = 30, **params: Any
) -> list[dict[str, Any]]:
    async def enough() -> bool:
        return len(await records(archiver, **params)) >= count

    await eventually(enough, timeout=timeout, interval=0.2, what=f"{count} archived")
    return await records(archiver, **params)
