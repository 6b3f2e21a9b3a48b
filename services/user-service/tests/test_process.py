"""user-service as the process a user runs: logs, signals, and the relay dying mid-batch."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter

import httpx

from tests.support.processes import ServiceRunner


def env(amqp_url: str, redis_url: str, redis_prefix: str, **extra: str) -> dict[str, str]:
    return {
        "COURIER_AMQP_URL": amqp_url,
        "COURIER_REDIS_URL": redis_url,
        "COURIER_REDIS_PREFIX": redis_prefix,
        "COURIER_OUTBOX_BLOCK_MS": "100",
        **extra,
    }


async def test_logs_never_show_an_email_or_phone_in_clear(
    services: ServiceRunner, amqp_url: str, redis_url: str, redis_prefix: str
) -> None:
    service = services.start("user-service", env(amqp_url, redis_url, redis_prefix))
    email, phone = "grace.hopper@navy.example", "+14155550123"
    body = {"email": email, "display_name": "Grace", "channels": ["sms"], "phone": phone}
    async with httpx.AsyncClient(base_url=service.url) as client:
        assert (await client.post("/v1/users", json=body)).status_code == 201
        assert (await client.post("/v1/users", json=body)).status_code == 409
        assert (await client.get("/v1/users", params={"email": email})).status_code == 200
        bad = {**body, "phone": "+1415555O123"}
        assert (await client.post("/v1/users", json=bad)).status_code == 422
    assert service.stop() == 0
    logs = service.logs(tail=10_000_000)
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    events = Counter(line["event"] for line in lines)
    assert events["http_request"] >= 4
    assert events["user_registered"] == 1
    for secret in (email, email.split("@")[0], phone, phone[1:], "+1415555O123"):
        assert secret not in logs


async def test_sigterm_stops_cleanly(
    services: ServiceRunner, amqp_url: str, redis_url: str, redis_prefix: str
) -> None:
    service = services.start("user-service", env(amqp_url, redis_url, redis_prefix))
    service.signal(signal.SIGTERM)
    assert service.proc is not None
    assert await asyncio.to_thread(service.proc.wait, 30) == 0
    assert "outbox_relay_stopped" in service.logs()
