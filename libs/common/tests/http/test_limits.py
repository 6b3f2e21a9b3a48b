"""The request body limit: 413 before an oversized body is read, 400 for a bad length."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
import structlog

from .app import LIMIT, App, assert_problem


async def test_declared_oversized_body_is_refused_unread(
    service: App, client: httpx.AsyncClient
) -> None:
    response = await client.post("/v1/upload", content=b"x" * (LIMIT + 1))
    body = assert_problem(response, 413)
    assert body["max_body_bytes"] == LIMIT
    assert service.upload_calls == 0
    # Answered before routing, but still counted against the route the client aimed at.
    assert service.requests("POST", "/v1/upload", 413) == 1


async def test_body_at_the_limit_is_accepted(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/upload", content=b"x" * LIMIT)
    assert response.status_code == 200
    assert response.json() == {"size": LIMIT}


async def _chunks(count: int, size: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield b"y" * size
        await asyncio.sleep(0)


@pytest.mark.parametrize("path", ["/v1/upload", "/v1/users"])
async def test_streamed_oversized_body_is_a_413(
    service: App, client: httpx.AsyncClient, path: str
) -> None:
    with structlog.testing.capture_logs() as logs:
        response = await client.post(
            path, content=_chunks(10, 200), headers={"content-type": "application/json"}
        )
    assert "content-length" not in response.request.headers
    assert_problem(response, 413)
    assert service.requests("POST", path, 413) == 1
    # The app saw a client disconnect; that is not a crash.
    assert not [entry for entry in logs if entry["event"] == "unhandled_exception"]


async def test_streamed_body_under_the_limit_is_read_whole(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/upload", content=_chunks(4, 200))
    assert response.status_code == 200
    assert response.json() == {"size": 800}


@pytest.mark.parametrize("value", ["abc", "-1", "12, 13"])
async def test_bad_content_length_is_a_400(
    service: App, client: httpx.AsyncClient, value: str
) -> None:
    response = await client.post("/v1/upload", headers={"content-length": value})
    assert_problem(response, 400)
    assert service.upload_calls == 0
