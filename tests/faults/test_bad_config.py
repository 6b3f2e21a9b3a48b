"""B5: a COURIER_AMQP_URL the broker refuses gets a clear answer from every service.

The three services as real processes, pointed at a vhost that does not exist yet (the broker
answers ``NOT_ALLOWED - vhost ... not found``) or with a wrong password (``ACCESS_REFUSED``).
Each logs ONE critical ``amqp_refused`` line naming the redacted URL and the broker's reply,
keeps retrying (with backoff, warnings at a bounded rate) and keeps answering ``/healthz``;
the consumers' ``/readyz`` is 503 with the reason; user-service stays ready (registrations go
to the outbox) and its ``/readyz`` says why the broker is not there. Then the operator creates
the vhost, and the welcome of a registration made while it was missing goes out: nothing lost.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from courier_sinks.http import HttpSink
from courier_sinks.smtp import SmtpSink
from courier_testing.backing import AMQP_HOST, AMQP_PORT, BrokerAdmin
from tests.support.archiver import ADMIN_TOKEN
from tests.support.faults import add_report_row
from tests.support.processes import ServiceProcess, ServiceRunner
from tests.support.stack import MAX_ATTEMPTS, RETRY_DELAYS

pytestmark = pytest.mark.fault

SERVICES = ("notification-service", "dlq-archiver", "user-service")
CONSUMERS = ("notification-service", "dlq-archiver")


def log_records(service: ServiceProcess) -> list[dict[str, Any]]:
    records = []
    for line in service.log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def start(
    services: ServiceRunner,
    amqp_url: str,
    redis_url: str,
    redis_prefix: str,
    smtp_sink: SmtpSink,
    http_sink: HttpSink,
) -> dict[str, ServiceProcess]:
    common = {
        "COURIER_AMQP_URL": amqp_url,
        "COURIER_REDIS_URL": redis_url,
        "COURIER_REDIS_PREFIX": redis_prefix,
        "COURIER_RETRY_DELAYS_SECONDS": str(RETRY_DELAYS),
        "COURIER_RETRY_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "COURIER_AMQP_MANAGEMENT_URL": f"http://guest:guest@{AMQP_HOST}:15672",
    }
    own = {
        "notification-service": {
            "COURIER_SMTP_PORT": str(smtp_sink.port),
            "COURIER_SMS_URL": f"{http_sink.url}/sms",
            "COURIER_PUSH_URL": f"{http_sink.url}/push",
            "COURIER_SMS_TOKEN": "sink-token",
            "COURIER_PUSH_TOKEN": "sink-token",
        },
        "dlq-archiver": {"COURIER_ADMIN_TOKEN": ADMIN_TOKEN},
        "user-service": {"COURIER_OUTBOX_BLOCK_MS": "50"},
    }
    # Started until /healthz answers: /readyz is what this test is about.
    return {
        name: services.start(name, {**common, **own[name]}, ready_path="/healthz")
        for name in SERVICES
    }


def readyz(service: ServiceProcess) -> tuple[int, dict[str, Any]]:
    response = httpx.get(f"{service.url}/readyz", timeout=5)
    body: dict[str, Any] = response.json()
    return response.status_code, body


def wait_until(check: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not in {timeout} s: {what}"
        time.sleep(0.3)


def assert_refusal_reported(
    processes: dict[str, ServiceProcess], *, reply: str, url: str, secret: str | None
) -> None:
    for name, service in processes.items():
        assert service.proc is not None
        assert service.proc.poll() is None, f"{name} exited"
        assert httpx.get(f"{service.url}/healthz", timeout=5).status_code == 200
        status, body = readyz(service)
        assert body["broker"] == "refused", (name, body)
        assert reply in body["broker_problem"], (name, body)
        if name in CONSUMERS:
            assert status == 503, (name, status, body)
        else:
            assert status == 200, (name, status, body)  # the outbox takes registrations
        records = log_records(service)
        critical = [r for r in records if r.get("level") == "critical"]
        assert [r["event"] for r in critical] == ["amqp_refused"], (name, critical)
        assert reply in critical[0]["broker_reply"], critical[0]
        assert critical[0]["url"] == url.replace(":guest@", ":***@").replace(f":{secret}@", ":***@")
        text = service.log_path.read_text(errors="replace")
        assert "Task exception was never retrieved" not in text, name
        if secret is not None:
            assert secret not in text, f"{name} logged the password"


def test_b5_unknown_vhost_is_reported_then_picked_up_when_created(
    services: ServiceRunner,
    broker_admin: BrokerAdmin,
    redis_url: str,
    redis_prefix: str,
    smtp_sink: SmtpSink,
    http_sink: HttpSink,
) -> None:
    name = f"courier-test-{id(services)}-b5"
    broker_admin.delete_vhost(name)
    url = f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/{quote(name, safe='')}"
    processes = start(services, url, redis_url, redis_prefix, smtp_sink, http_sink)
    try:
        wait_until(
            lambda: all(readyz(p)[1].get("broker") == "refused" for p in processes.values()),
            "every service reports the refusal",
        )
        time.sleep(3)  # several retries: still one critical line each
        assert_refusal_reported(processes, reply="NOT_ALLOWED", url=url, secret=None)
        users = processes["user-service"]
        payload = {"email": "b5-late-vhost@example.com", "display_name": "Ada", "locale": "en"}
        response = httpx.post(f"{users.url}/v1/users", json=payload, timeout=10)
        assert response.status_code == 201, response.text  # into the outbox, not lost

        broker_admin.create_vhost(name)  # the operator's fix
        wait_until(
            lambda: all(readyz(p)[0] == 200 for p in processes.values()),
            "every service ready once the vhost exists",
            timeout=90,
        )
        wait_until(
            lambda: any("b5-late-vhost@example.com" in m["rcpt_tos"] for m in smtp_sink.messages),
            "the welcome of the registration made while the vhost was missing",
        )
        for service in processes.values():
            assert readyz(service)[1]["broker"] == "connected"
            assert "broker_problem" not in readyz(service)[1]
    finally:
        for service in processes.values():
            service.stop()
        broker_admin.delete_vhost(name)
    add_report_row(scenario="B5 unknown vhost, created later", accepted=1, sent=1, lost=0)


@pytest.mark.matrix
def test_b5_wrong_password_is_one_critical_line_and_a_503(
    services: ServiceRunner,
    broker_admin: BrokerAdmin,
    redis_url: str,
    redis_prefix: str,
    smtp_sink: SmtpSink,
    http_sink: HttpSink,
) -> None:
    secret = "not-the-pw-b5"
    name = f"courier-test-{id(services)}-b5pw"
    broker_admin.create_vhost(name)
    url = f"amqp://guest:{secret}@{AMQP_HOST}:{AMQP_PORT}/{quote(name, safe='')}"
    processes = start(services, url, redis_url, redis_prefix, smtp_sink, http_sink)
    try:
        wait_until(
            lambda: all(readyz(p)[1].get("broker") == "refused" for p in processes.values()),
            "every service reports the refusal",
        )
        time.sleep(3)
        assert_refusal_reported(processes, reply="ACCESS_REFUSED", url=url, secret=secret)
        # It keeps retrying: SIGTERM still stops it cleanly.
        for service in processes.values():
            assert service.stop() == 0
    finally:
        broker_admin.delete_vhost(name)
