"""The archiver in-process for tests, and helpers to read its archive.

Loaded as a pytest plugin by the root conftest."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from courier_testing.polling import eventually
from dlq_archiver.config import Settings
from dlq_archiver.main import create_app
from tests.support.processes import ServiceProcess, ServiceRunner

ADMIN_TOKEN = "test-admin-token-0123456789"
#: The ``start_archiver`` fixture: a dlq-archiver process, ``COURIER_*`` overrides as keywords.
StartArchiver = Callable[..., ServiceProcess]


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
def start_archiver(
    services: ServiceRunner, amqp_url: str, redis_url: str, redis_prefix: str
) -> StartArchiver:
    """Start a dlq-archiver process on this test's broker vhost and Redis prefix, with the admin
    token and short retry tiers; keyword arguments add ``COURIER_*`` variables."""

    def start(**env: str) -> ServiceProcess:
        return services.start(
            "dlq-archiver",
            {
                "COURIER_AMQP_URL": amqp_url,
                "COURIER_REDIS_URL": redis_url,
                "COURIER_REDIS_PREFIX": redis_prefix,
                "COURIER_ADMIN_TOKEN": ADMIN_TOKEN,
                "COURIER_RETRY_DELAYS_SECONDS": "[0.3, 0.6, 1.2]",
                "COURIER_RETRY_MAX_ATTEMPTS": "4",
                **env,
            },
        )

    return start


def courier_dlq(
    url: str, *args: str, token: str | None = ADMIN_TOKEN
) -> subprocess.CompletedProcess[str]:
    """The venv's ``courier-dlq``, with nothing but the URL and the token from its environment."""
    script = Path(sys.executable).parent / "courier-dlq"
    env = {"COURIER_DLQ_URL": url, "PATH": "/usr/bin:/bin"}
    if token:
        env["COURIER_ADMIN_TOKEN"] = token
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, env=env, timeout=60, check=False
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
