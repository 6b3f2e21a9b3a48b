"""Every service's HTTP spans come from one place: the OpenTelemetry ASGI instrumentation.

FastAPI (0.16x and later) has telemetry of its own, on by default whenever a tracer provider
is set, as in every test here and every deployment. Courier switches it off
(``courier_common.http.NO_NATIVE_TELEMETRY``); these tests fail if a service app runs it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.telemetry import _asgi
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

import dlq_archiver.config
import dlq_archiver.main
import notification_service.config
import notification_service.main
import user_service.config
import user_service.main


def _user_service() -> FastAPI:
    return user_service.main.create_app(user_service.config.Settings(environment="test"))


def _notification_service() -> FastAPI:
    return notification_service.main.create_app(
        notification_service.config.Settings(environment="test")
    )


def _dlq_archiver() -> FastAPI:
    return dlq_archiver.main.create_app(
        dlq_archiver.config.Settings(environment="test", admin_token="t" * 32)
    )


@pytest.fixture
def native_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every request FastAPI's native telemetry wrapped, by path."""
    calls: list[str] = []
    original = _asgi.NativeTelemetry.__call__

    async def recording(self: Any, **kwargs: Any) -> None:
        calls.append(kwargs["scope"]["path"])
        await original(self, **kwargs)

    monkeypatch.setattr(_asgi.NativeTelemetry, "__call__", recording)
    return calls


@pytest.mark.parametrize(
    "build", [_user_service, _notification_service, _dlq_archiver], ids=lambda f: f.__name__[1:]
)
async def test_no_service_runs_fastapis_own_telemetry(
    build: Callable[[], FastAPI], native_calls: list[str]
) -> None:
    assert isinstance(trace.get_tracer_provider(), TracerProvider)  # so it would be on
    app = build()  # no lifespan: /healthz needs no backend
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://service"
    ) as client:
        assert (await client.get("/healthz")).status_code == 200
    assert native_calls == []


async def test_the_check_sees_native_telemetry_when_it_is_on(native_calls: list[str]) -> None:
    app = FastAPI()  # FastAPI's default

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        return {"ok": "yes"}

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://service"
    ) as client:
        assert (await client.get("/ping")).status_code == 200
    assert native_calls == ["/ping"]
