"""The three Courier services as real processes, wired to one broker, Redis and the sinks.

What `make run` starts, minus honcho: each service is its console script with its environment,
so tests see exactly what an operator's Prometheus or tracing backend would see. Loaded as a
pytest plugin by the root conftest (fixture ``chain``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import httpx
import pytest

from courier_sinks.http import HttpSink
from courier_sinks.smtp import SmtpSink
from courier_testing.env import backing_env
from tests.support.archiver import ADMIN_TOKEN
from tests.support.processes import ServiceProcess, ServiceRunner
from tests.support.stack import MAX_ATTEMPTS, RETRY_DELAYS

#: The console scripts, in start order: consumers first, so nothing waits on a missing queue.
SERVICES = ("notification-service", "dlq-archiver", "user-service")


@dataclass
class Chain:
    """The running services by name, and a client for user-service's API."""

    processes: dict[str, ServiceProcess]

    def url(self, service: str) -> str:
        return self.processes[service].url

    def register(self, email: str, **extra: object) -> dict[str, object]:
        body = {"email": email, "display_name": "Ada", "locale": "en", **extra}
        response = httpx.post(f"{self.url('user-service')}/v1/users", json=body, timeout=10)
        assert response.status_code == 201, response.text
        user: dict[str, object] = response.json()
        return user

    def metrics_text(self, service: str) -> str:
        response = httpx.get(f"{self.url(service)}/metrics", timeout=10)
        response.raise_for_status()
        return response.text


def start_chain(
    runner: ServiceRunner,
    *,
    amqp_url: str,
    redis_url: str,
    redis_prefix: str,
    smtp_sink: SmtpSink,
    http_sink: HttpSink,
    management_url: str | None = None,
    extra_env: Mapping[str, str] | None = None,
    service_env: Mapping[str, Mapping[str, str]] | None = None,
) -> Chain:
    """Start the three services (fast retry tiers, quick gauges) and wait until each is ready.

    *management_url* is the broker's management API with credentials when it is not on the AMQP
    host's port 15672 (a private node). *extra_env* goes to every service (``OTEL_*``, say),
    *service_env* to one service by name (applied last).
    """
    common = {
        **backing_env(amqp_url, redis_url, redis_prefix),
        "COURIER_RETRY_DELAYS_SECONDS": str(RETRY_DELAYS),
        "COURIER_RETRY_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        **({"COURIER_AMQP_MANAGEMENT_URL": management_url} if management_url else {}),
        **(extra_env or {}),
    }
    own: dict[str, dict[str, str]] = {
        "notification-service": {
            "COURIER_SMTP_PORT": str(smtp_sink.port),
            "COURIER_SMS_URL": f"{http_sink.url}/sms",
            "COURIER_PUSH_URL": f"{http_sink.url}/push",
            "COURIER_SMS_TOKEN": "sink-token",
            "COURIER_PUSH_TOKEN": "sink-token",
            "COURIER_IDEMPOTENCY_LEASE_SECONDS": "5",
            "COURIER_BACKLOG_POLL_SECONDS": "1",
        },
        "dlq-archiver": {
            "COURIER_ADMIN_TOKEN": ADMIN_TOKEN,
            "COURIER_GAUGES_INTERVAL_SECONDS": "0.5",
        },
        "user-service": {"COURIER_OUTBOX_BLOCK_MS": "50"},
    }
    overrides = service_env or {}
    processes = {
        name: runner.start(name, {**common, **own[name], **overrides.get(name, {})})
        for name in SERVICES
    }
    return Chain(processes=processes)


@pytest.fixture
def chain(
    services: ServiceRunner,
    amqp_url: str,
    redis_url: str,
    redis_prefix: str,
    smtp_sink: SmtpSink,
    http_sink: HttpSink,
) -> Chain:
    """The three services on the shared broker (the test's vhost) and Redis (its prefix)."""
    return start_chain(
        services,
        amqp_url=amqp_url,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        smtp_sink=smtp_sink,
        http_sink=http_sink,
    )
