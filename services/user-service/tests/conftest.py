"""user-service fixtures: the app in-process on the real Redis and RabbitMQ (own vhost)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from user_service.config import Settings
from user_service.main import create_app


@pytest.fixture
def settings(amqp_url: str, redis_url: str, redis_prefix: str) -> Settings:
    return Settings(
        amqp_url=amqp_url,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        environment="test",
        outbox_block_ms=100,
        outbox_claim_idle_ms=1000,
        outbox_retry_max_seconds=0.5,
    )


@pytest.fixture
def make_client() -> Callable[[Settings], Any]:
    """An HTTP client on a freshly built app with its lifespan running."""

    def make(settings: Settings) -> Any:
        class _Client:
            async def __aenter__(self) -> httpx.AsyncClient:
                self.manager = LifespanManager(create_app(settings), startup_timeout=30)
                await self.manager.__aenter__()
                app = self.manager.app
                self.client = httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://user-service"
                )
                self.app = app
                return self.client

            async def __aexit__(self, *exc: object) -> None:
                await self.client.aclose()
                await self.manager.__aexit__(None, None, None)

        return _Client()

    return make


@pytest.fixture
async def client(
    settings: Settings, make_client: Callable[[Settings], Any]
) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(settings) as client:
        yield client
