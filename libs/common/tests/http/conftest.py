"""The service the HTTP plumbing's tests talk to, and a client on it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from .app import App


@pytest.fixture
def service() -> App:
    return App()


@pytest.fixture
async def client(service: App) -> AsyncIterator[httpx.AsyncClient]:
    async with service.client() as http:
        yield http
