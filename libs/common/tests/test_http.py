"""What clients, operators and Prometheus see from the shared HTTP plumbing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Annotated, Any

import httpx
import pytest
import redis.exceptions
import structlog
from fastapi import FastAPI, HTTPException, Query, Request
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, Field, field_validator
from starlette.types import ASGIApp

from courier_common.http import (
    PROBLEM_JSON,
    BodySizeLimitMiddleware,
    HttpMetrics,
    HttpMetricsMiddleware,
    ProblemError,
    health_router,
    install_problem_handlers,
)
from courier_common.redis import NotReplicatedError

EMAIL = "alice@example.com"
SECRET = "hunter2-very-secret"
LIMIT = 1024

Readiness = Callable[[], Awaitable[Mapping[str, Any]]]

REDIS_ERRORS: dict[str, Exception] = {
    "down": redis.exceptions.ConnectionError("Error 111 connecting to 10.0.0.7:6379"),
    "late": NotReplicatedError(0, 1, 1000),
    "noreplicas": redis.exceptions.ResponseError("NOREPLICAS Not enough good replicas to write."),
    "readonly": redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
    "wrongtype": redis.exceptions.ResponseError("WRONGTYPE Operation against a key"),
}


async def _ready() -> Mapping[str, Any]:
    return {"ready": True, "redis": "ok"}


class NewUser(BaseModel):
    email: str
    password: str = Field(max_length=64)
    age: int

    @field_validator("email")
    @classmethod
    def _no_example_domain(cls, value: str) -> str:
        if value.endswith("@example.com"):
            # A validator that quotes its input, as real code does: the handler must cut it out.
            raise ValueError(f"{value} is not an allowed address")
        return value


class App:
    """A small service built the way the real ones are, plus what it observed."""

    def __init__(
        self,
        readiness: Readiness = _ready,
        *,
        wrap_outside: bool = False,
        max_body_bytes: int = LIMIT,
    ) -> None:
        self.registry = CollectorRegistry()
        self.upload_calls = 0
        app = FastAPI()
        install_problem_handlers(app)
        app.include_router(
            health_router(
                readiness=readiness, registry=self.registry, readiness_timeout_seconds=0.2
            )
        )

        @app.get("/v1/users/{user_id}")
        async def get_user(user_id: str) -> dict[str, str]:
            if user_id == "missing":
                raise ProblemError(
                    404,
                    "User not found",
                    "No user has this id.",
                    type="https://courier.example/problems/user-not-found",
                    extra={"user_id": user_id, "status": 200},
                    headers={"Cache-Control": "no-store"},
                )
            if user_id == "locked":
                raise HTTPException(401, headers={"WWW-Authenticate": "Bearer"})
            return {"user_id": user_id}

        @app.get("/v1/users")
        async def find_users(
            email: str | None = None, limit: Annotated[int, Query(le=100)] = 10
        ) -> list[str]:
            return []

        @app.post("/v1/users", status_code=201)
        async def register(user: NewUser) -> dict[str, str]:
            return {"email": user.email}

        @app.post("/v1/upload")
        async def upload(request: Request) -> dict[str, int]:
            self.upload_calls += 1
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
            return {"size": size}

        @app.get("/boom")
        async def boom() -> None:
            raise RuntimeError(f"token {SECRET} for {EMAIL}")

        @app.get("/v1/store/{kind}")
        async def read_store(kind: str) -> None:
            raise REDIS_ERRORS[kind]

        @app.post("/v1/store/{kind}")
        async def write_store(kind: str) -> None:
            raise REDIS_ERRORS[kind]

        metrics = HttpMetrics(self.registry)
        app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=max_body_bytes)
        self.app: ASGIApp = app
        if wrap_outside:
            self.app = HttpMetricsMiddleware(app, metrics=metrics)
        else:
            app.add_middleware(HttpMetricsMiddleware, metrics=metrics)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://courier.test"
        )

    def requests(self, method: str, route: str, status: int) -> float:
        value = self.registry.get_sample_value(
            "courier_http_requests_total",
            {"method": method, "route": route, "status": str(status)},
        )
        return value or 0.0

    def routes_seen(self) -> set[str]:
        return {
            sample.labels["route"]
            for metric in self.registry.collect()
            if metric.name == "courier_http_requests"
            for sample in metric.samples
        }


@pytest.fixture
def service() -> App:
    return App()


@pytest.fixture
async def client(service: App) -> AsyncIterator[httpx.AsyncClient]:
    async with service.client() as http:
        yield http


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM_JSON
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["type"]
    assert body["title"]
    return body


# --------------------------------------------------------------------------------------------
# Problem details
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Body size limit
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Metrics and the request log line
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap_outside", [False, True])
async def test_route_label_is_the_template(wrap_outside: bool) -> None:
    service = App(wrap_outside=wrap_outside)
    async with service.client() as client:
        for user_id in ("u1", "u2", "missing"):
            await client.get(f"/v1/users/{user_id}")
        await client.delete("/v1/users/u3")
        for n in range(3):
            await client.get(f"/scan/{n}/.env")
        await client.request("PROPFIND", "/v1/users/u1")
    assert service.requests("GET", "/v1/users/{user_id}", 200) == 2
    assert service.requests("GET", "/v1/users/{user_id}", 404) == 1
    assert service.requests("DELETE", "/v1/users/{user_id}", 405) == 1
    assert service.requests("GET", "unmatched", 404) == 3
    assert service.requests("OTHER", "/v1/users/{user_id}", 405) == 1
    assert service.routes_seen() == {"/v1/users/{user_id}", "unmatched"}
    assert (
        service.registry.get_sample_value(
            "courier_http_request_duration_seconds_count",
            {"method": "GET", "route": "/v1/users/{user_id}"},
        )
        == 3
    )
    assert service.registry.get_sample_value(
        "courier_http_requests_in_flight", {"method": "GET"}
    ) == (0)


async def test_one_log_line_per_request_without_path_or_query(client: httpx.AsyncClient) -> None:
    with structlog.testing.capture_logs() as logs:
        await client.get("/v1/users", params={"email": EMAIL})
        await client.get("/v1/users/u1")
    lines = [entry for entry in logs if entry["event"] == "http_request"]
    assert len(lines) == 2
    first = lines[0]
    assert set(first) == {"event", "log_level", "method", "route", "status", "duration_ms"}
    assert (first["method"], first["route"], first["status"]) == ("GET", "/v1/users", 200)
    assert first["log_level"] == "info"
    assert isinstance(first["duration_ms"], float)
    assert lines[1]["route"] == "/v1/users/{user_id}"
    rendered = repr(logs)
    assert "alice" not in rendered
    assert "email=" not in rendered
    assert "/v1/users/u1" not in rendered


async def test_probes_are_counted_but_not_logged(service: App, client: httpx.AsyncClient) -> None:
    with structlog.testing.capture_logs() as logs:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(path)).status_code == 200
    assert not [entry for entry in logs if entry["event"] == "http_request"]
    assert service.requests("GET", "/healthz", 200) == 1
    assert service.requests("GET", "/metrics", 200) == 1


# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------


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
