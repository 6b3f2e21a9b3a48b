"""Every error as problem details (RFC 9457), never echoing what the client sent."""

from __future__ import annotations

import httpx
import pytest
import structlog

from .app import EMAIL, SECRET, App, assert_problem


async def test_problem_error_becomes_a_problem_body(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/users/missing")
    body = assert_problem(response, 404)
    assert body == {
        "type": "https://courier.example/problems/user-not-found",
        "title": "User not found",
        "status": 404,  # the extension member "status": 200 cannot overwrite it
        "detail": "No user has this id.",
        "user_id": "missing",
    }
    assert response.headers["cache-control"] == "no-store"


async def test_unknown_route_is_a_404_problem(client: httpx.AsyncClient) -> None:
    body = assert_problem(await client.get("/wp-admin/setup.php"), 404)
    assert body == {"type": "about:blank", "title": "Not Found", "status": 404}


async def test_wrong_method_is_a_405_problem_with_allow(client: httpx.AsyncClient) -> None:
    response = await client.delete("/v1/users/u1")
    body = assert_problem(response, 405)
    assert body["title"] == "Method Not Allowed"
    assert response.headers["allow"] == "GET"


async def test_http_exception_keeps_its_headers(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/users/locked")
    assert_problem(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"


async def test_validation_error_never_echoes_what_was_sent() -> None:
    long_value = "S" * 10_000
    async with App(max_body_bytes=64 * 1024).client() as client:
        response = await client.post(
            "/v1/users", json={"email": EMAIL, "password": long_value, "age": SECRET}
        )
    body = assert_problem(response, 422)
    assert EMAIL not in response.text
    assert "alice" not in response.text
    assert SECRET not in response.text
    assert "S" * 64 not in response.text
    assert '"input"' not in response.text
    assert '"ctx"' not in response.text
    by_field = {tuple(error["loc"]): error for error in body["errors"]}
    assert set(by_field) == {("body", "email"), ("body", "password"), ("body", "age")}
    for error in body["errors"]:
        assert set(error) == {"loc", "msg", "type"}
    assert by_field[("body", "password")]["type"] == "string_too_long"
    assert by_field[("body", "age")]["type"] == "int_parsing"
    assert "[redacted]" in by_field[("body", "email")]["msg"]


async def test_query_validation_error_never_echoes_the_value(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/users", params={"email": EMAIL, "limit": SECRET})
    body = assert_problem(response, 422)
    assert SECRET not in response.text
    assert EMAIL not in response.text
    assert body["errors"][0]["loc"] == ["query", "limit"]


async def test_malformed_json_is_a_400_without_echo(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/users",
        content=f'{{"email": "{EMAIL}", "password": "{SECRET}",'.encode(),
        headers={"content-type": "application/json"},
    )
    body = assert_problem(response, 400)
    assert "not valid JSON" in body["detail"]
    assert EMAIL not in response.text
    assert SECRET not in response.text


async def test_crash_is_a_generic_500_logged_once(service: App, client: httpx.AsyncClient) -> None:
    # ASGITransport re-raises app exceptions by default: the request completing at all shows
    # the exception is not re-raised towards the server (which would log it a second time).
    with structlog.testing.capture_logs() as logs:
        response = await client.get("/boom")
    body = assert_problem(response, 500)
    assert SECRET not in response.text
    assert EMAIL not in response.text
    assert "RuntimeError" not in response.text
    assert set(body) == {"type", "title", "status", "detail"}
    crashes = [entry for entry in logs if entry["event"] == "unhandled_exception"]
    assert len(crashes) == 1
    assert crashes[0]["log_level"] == "error"
    assert crashes[0]["exc_info"] is True
    assert crashes[0]["route"] == "/boom"
    assert service.requests("GET", "/boom", 500) == 1


@pytest.mark.parametrize("kind", ["down", "noreplicas", "readonly"])
async def test_redis_away_is_a_retryable_503_and_a_write_may_have_been_applied(
    client: httpx.AsyncClient, kind: str
) -> None:
    read = await client.get(f"/v1/store/{kind}")
    body = assert_problem(read, 503)
    assert body["title"] == "Storage unavailable"
    assert read.headers["retry-after"] == "5"
    assert "may have been applied" not in body["detail"]
    assert "10.0.0.7" not in read.text
    write = assert_problem(await client.post(f"/v1/store/{kind}"), 503)
    assert "may have been applied" in write["detail"]
    assert "Idempotency-Key" in write["detail"]


async def test_replicas_late_is_a_503_that_says_the_write_is_in_doubt(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/v1/store/late")
    body = assert_problem(response, 503)
    assert body["title"] == "Storage unavailable"
    assert response.headers["retry-after"] == "5"
    assert "replicas did not confirm" in body["detail"]
    assert "may have been applied" in body["detail"]
    assert (body["replicas_required"], body["replicas_confirmed"]) == (1, 0)


async def test_a_redis_error_reply_that_is_a_bug_is_a_500_logged_once(
    service: App, client: httpx.AsyncClient
) -> None:
    with structlog.testing.capture_logs() as logs:
        response = await client.post("/v1/store/wrongtype")
    body = assert_problem(response, 500)
    assert "WRONGTYPE" not in response.text
    assert set(body) == {"type", "title", "status", "detail"}
    crashes = [entry for entry in logs if entry["event"] == "unhandled_exception"]
    assert len(crashes) == 1
    assert not [entry for entry in logs if entry["event"] == "storage_unavailable"]


async def test_without_storage_errors_a_redis_error_is_a_500() -> None:
    # Problem handling knows no data store: only what the service passes is a 503.
    with structlog.testing.capture_logs() as logs:
        async with App(unavailable=None).client() as client:
            response = await client.post("/v1/store/down")
    assert_problem(response, 500)
    assert len([entry for entry in logs if entry["event"] == "unhandled_exception"]) == 1
