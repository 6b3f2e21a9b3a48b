"""Liveness, readiness and the scrape endpoint, as Kubernetes and Prometheus use them."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import httpx
import pytest

from .app import SECRET, App, Readiness


async def test_healthz_answers_while_the_process_lives(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_is_200_when_ready(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"ready": True, "redis": "ok"}
    assert response.headers["cache-control"] == "no-store"


async def _not_ready() -> Mapping[str, Any]:
    return {"ready": False, "redis": "ok", "amqp": "connection refused"}


async def _raises() -> Mapping[str, Any]:
    raise ConnectionError(f"redis://:{SECRET}@redis:6379 refused")


async def _hangs() -> Mapping[str, Any]:
    await asyncio.sleep(30)
    return {"ready": True}


async def _no_verdict() -> Mapping[str, Any]:
    return {"redis": "ok"}


@pytest.mark.parametrize(
    ("readiness", "expected"),
    [
        (_not_ready, {"ready": False, "redis": "ok", "amqp": "connection refused"}),
        (_raises, {"ready": False, "reason": "readiness check raised ConnectionError"}),
        (_hangs, {"ready": False, "reason": "readiness check timed out after 0.2s"}),
        (_no_verdict, {"ready": False, "redis": "ok"}),
    ],
)
async def test_readyz_is_503_when_not_ready(readiness: Readiness, expected: dict[str, Any]) -> None:
    async with App(readiness).client() as client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == expected
    assert SECRET not in response.text


async def test_metrics_endpoint_exposes_the_registry(client: httpx.AsyncClient) -> None:
    await client.get("/v1/users/u1")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    assert "courier_http_requests_total{" in response.text
    assert 'route="/v1/users/{user_id}"' in response.text


async def test_probes_stay_out_of_the_openapi_schema(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert "/v1/users" in paths
    assert not {"/healthz", "/readyz", "/metrics"} & set(paths)
