"""Several notification-service processes on one queue: shared work, crashes, no loss."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import httpx

from courier_common.messaging import AmqpConnection
from courier_sinks.http import HttpSink
from courier_sinks.smtp import SmtpSink
from courier_testing.metrics import sample
from courier_testing.polling import eventually, ready_count
from notification_service.config import Settings as NotifierSettings
from notification_service.routes import USER_EVENTS_QUEUE
from tests.support.processes import ServiceProcess, ServiceRunner
from tests.support.stack import service_env
from user_service.config import Settings as UserSettings


async def register_many(service: ServiceProcess, emails: list[str]) -> None:
    limits = asyncio.Semaphore(50)
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:

        async def one(email: str) -> int:
            async with limits:
                response = await client.post(
                    "/v1/users", json={"email": email, "display_name": "U"}
                )
                return response.status_code

        statuses = await asyncio.gather(*(one(e) for e in emails))
    assert Counter(statuses) == {201: len(emails)}


def metric(service: ServiceProcess, name: str, **labels: str) -> float:
    return sample(httpx.get(f"{service.url}/metrics").text, name, **labels)


def sent_count(service: ServiceProcess) -> float:
    return metric(service, "courier_notifications_total", channel="email", outcome="sent")


def acked_count(service: ServiceProcess) -> float:
    return metric(
        service,
        "courier_messages_consumed_total",
        queue=USER_EVENTS_QUEUE,
        event_type="user.registered",
        outcome="acked",
    )


async def test_two_workers_share_the_queue_and_send_each_email_once(
    services: ServiceRunner,
    notifier_settings: NotifierSettings,
    user_settings: UserSettings,
    smtp_sink: SmtpSink,
) -> None:
    workers = [
        services.start("notification-service", service_env(notifier_settings)) for _ in range(2)
    ]
    users = services.start("user-service", service_env(user_settings))
    emails = [f"user{i}@example.com" for i in range(500)]
    await register_many(users, emails)

    await eventually(
        lambda: len(smtp_sink.messages) >= 500, timeout=120, interval=0.2, what="500 emails"
    )
    # Every registration's delivery acked: no copy of one is left to be sent.
    await eventually(
        lambda: sum(acked_count(w) for w in workers) == 500, what="500 deliveries acked"
    )
    recipients = Counter(m["rcpt_tos"][0] for m in smtp_sink.messages)
    assert set(recipients) == set(emails)
    assert max(recipients.values()) == 1
    shares = [sent_count(w) for w in workers]
    assert sum(shares) == 500
    assert all(share > 0 for share in shares), shares  # both took part


async def test_a_worker_killed_during_a_burst_loses_nothing(
    services: ServiceRunner,
    notifier_settings: NotifierSettings,
    user_settings: UserSettings,
    smtp_sink: SmtpSink,
    amqp_url: str,
) -> None:
    env = service_env(notifier_settings) | {
        "COURIER_IDEMPOTENCY_LEASE_SECONDS": "1",
        "COURIER_AMQP_PREFETCH": "16",
    }
    victim = services.start("notification-service", env)
    survivor = services.start("notification-service", env)
    users = services.start("user-service", service_env(user_settings))
    emails = [f"burst{i}@example.com" for i in range(300)]
    registering = asyncio.create_task(register_many(users, emails))

    await eventually(lambda: len(smtp_sink.messages) >= 40, timeout=60, what="the burst")
    victim.kill()
    await registering

    connection = await AmqpConnection(amqp_url, client_name="test").connect()
    channel = await connection.channel()
    dead: list[str] = []

    async def accounted() -> bool:
        queue = await channel.get_queue("courier.dead-letters", ensure=False)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            dead.append(json.loads(message.body)["data"]["email"])
        sent = {m["rcpt_tos"][0] for m in smtp_sink.messages}
        return sent | set(dead) >= set(emails)

    try:
        await eventually(accounted, timeout=120, interval=0.3, what="every registration")
        await eventually(lambda: _work_queue_empty(channel), timeout=30, what="an empty work queue")
    finally:
        await connection.close()
    recipients = Counter(m["rcpt_tos"][0] for m in smtp_sink.messages)
    duplicates = sum(count - 1 for count in recipients.values())
    lost = set(emails) - set(recipients) - set(dead)
    assert lost == set()
    assert set(recipients) <= set(emails)  # nothing unexpected
    # Only what the victim held in flight (its prefetch) can have been sent twice.
    assert duplicates <= 16, f"{duplicates} duplicates"
    assert survivor.proc is not None
    assert survivor.proc.poll() is None
    print(f"killed worker: {duplicates} duplicate(s), {len(dead)} dead-lettered")


async def _work_queue_empty(channel: object) -> bool:
    return await ready_count(channel, USER_EVENTS_QUEUE) == 0  # type: ignore[arg-type]


async def test_sigterm_drains_in_flight_sends_and_exits_zero(
    services: ServiceRunner,
    notifier_settings: NotifierSettings,
    user_settings: UserSettings,
    http_sink: HttpSink,
    amqp_url: str,
) -> None:
    worker = services.start("notification-service", service_env(notifier_settings))
    users = services.start("user-service", service_env(user_settings))
    http_sink.delay_next(5, 1500, path="/sms")
    async with httpx.AsyncClient(base_url=users.url) as client:
        for i in range(5):
            response = await client.post(
                "/v1/users",
                json={
                    "email": f"slow{i}@example.com",
                    "display_name": "S",
                    "channels": ["sms"],
                    "phone": "+14155552671",
                },
            )
            assert response.status_code == 201

    async def all_in_flight() -> bool:
        async with httpx.AsyncClient() as client:
            ready = (await client.get(f"{worker.url}/readyz")).json()
        return bool(ready.get("in_flight") == 5)

    await eventually(all_in_flight, what="5 slow sends in flight")
    assert await asyncio.to_thread(worker.stop, 30) == 0
    assert len(http_sink.deliveries) == 5
    assert "consumer_draining" in worker.logs(tail=10_000_000)
    connection = await AmqpConnection(amqp_url, client_name="test").connect()
    try:
        channel = await connection.channel()
        assert await ready_count(channel, USER_EVENTS_QUEUE) == 0
    finally:
        await connection.close()
