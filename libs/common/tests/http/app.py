"""A small service built the way the real ones are, for the HTTP plumbing's tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any

import httpx
import redis.exceptions
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
    StorageErrors,
    health_router,
    install_problem_handlers,
)
from courier_common.redis import STORAGE_ERRORS, NotReplicatedError

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
        unavailable: StorageErrors | None = STORAGE_ERRORS,
    ) -> None:
        self.registry = CollectorRegistry()
        self.upload_calls = 0
        app = FastAPI()
        install_problem_handlers(app, unavailable=unavailable)
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


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM_JSON
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["type"]
    assert body["title"]
    return body
