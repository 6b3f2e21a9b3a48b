"""What Prometheus and the log see of each request: the route template, never the path."""

from __future__ import annotations

import httpx
import pytest
import structlog

from .app import EMAIL, App


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
