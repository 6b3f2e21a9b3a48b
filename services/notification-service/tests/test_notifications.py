"""Registration to inbox: welcome email, SMS and push through the real stack and sinks."""

from __future__ import annotations

import time

from courier_common.messaging import AmqpConnection
from courier_sinks.http import HttpSink
from courier_sinks.smtp import SmtpSink
from courier_testing.polling import eventually, get_all, ready_count
from notification_service.routes import USER_EVENTS_QUEUE
from tests.support.stack import Stack


async def wait_mail(sink: SmtpSink, count: int, timeout: float = 20) -> list[dict[str, object]]:
    await eventually(lambda: len(sink.messages) >= count, timeout=timeout, what=f"{count} mails")
    return list(sink.messages)  # type: ignore[arg-type]


async def test_registration_sends_a_welcome_on_every_chosen_channel(
    stack: Stack, smtp_sink: SmtpSink, http_sink: HttpSink
) -> None:
    user = await stack.register(
        "ada@example.com",
        locale="zh-CN",
        display_name="李雷",
        channels=["email", "sms", "push"],
        phone="+14155552671",
        push_token="device-token-1",
    )
    [mail] = await wait_mail(smtp_sink, 1)
    await eventually(lambda: len(http_sink.deliveries) == 2, what="an SMS and a push")
    assert mail["rcpt_tos"] == ["ada@example.com"]
    assert mail["subject"] == "欢迎加入 Courier，李雷"
    assert "欢迎加入" in str(mail["text"])
    assert "<strong>Courier</strong>" in str(mail["html"])
    assert mail["headers"]["content-language"] == "zh-CN"  # type: ignore[index]
    message_id = str(mail["message_id"])

    by_path = {r["path"]: r for r in http_sink.deliveries}
    sms, push = by_path["/sms"], by_path["/push"]
    assert sms["body"]["to"] == "+14155552671"
    assert sms["body"]["locale"] == "zh-CN"
    assert sms["body"]["text"].startswith("李雷，您好")
    event_id = sms["body"]["reference"]
    assert sms["headers"]["idempotency-key"] == f"{event_id}:sms"
    assert push["headers"]["idempotency-key"] == f"{event_id}:push"
    assert push["body"]["token"] == "device-token-1"
    assert message_id == f"<{event_id}.welcome@courier.local>"
    assert user["id"]

    # The sink has the mail as soon as SMTP's DATA is accepted; the notifier counts the send
    # only after its SMTP session returns, so the counter may lag the mail by a moment.
    async def counted() -> bool:
        sent = await stack.metric("courier_notifications_total", channel="email", outcome="sent")
        return sent == 1

    await eventually(counted, what="the email counted as sent")


async def test_smtp_451_twice_then_delivered_once_after_the_tiers(
    stack: Stack, smtp_sink: SmtpSink
) -> None:
    smtp_sink.fail_next(2, 451, "4.3.0 try again later")
    started = time.monotonic()
    await stack.register("grace@example.com")
    await wait_mail(smtp_sink, 1)
    elapsed = time.monotonic() - started
    await stack.consumed("acked", 1)  # the attempt that sent it is settled: no more to come
    assert len(smtp_sink.messages) == 1
    assert elapsed >= 0.3 + 0.6  # waited in the first two retry tiers
    retried = await stack.metric(
        "courier_messages_consumed_total",
        queue=USER_EVENTS_QUEUE,
        event_type="user.registered",
        outcome="retried",
    )
    assert retried == 2
    assert (
        await stack.metric("courier_notifications_total", channel="email", outcome="retryable") == 2
    )


async def test_smtp_550_is_dead_lettered_once_without_retry(
    stack: Stack, smtp_sink: SmtpSink, amqp_url: str
) -> None:
    smtp_sink.fail_next(1, 550, "5.1.1 mailbox unavailable")
    await stack.register("nobody@example.com")
    connection = await AmqpConnection(amqp_url, client_name="test").connect()
    try:
        channel = await connection.channel()
        [dead] = await get_all(channel, "courier.dead-letters", expect=1, timeout=20)
        assert dead.headers["x-courier-failure-kind"] == "permanent"
        assert "SMTP 550" in str(dead.headers["x-courier-failure-reason"])
        assert dead.headers["x-courier-attempt"] == 1
        assert dead.headers["x-courier-original-routing-key"] == "user.registered"
        await stack.consumed("dead_lettered", 1)  # settled: it cannot come back
        assert await ready_count(channel, "courier.dead-letters") == 0  # once, not again
    finally:
        await connection.close()
    assert smtp_sink.messages == []
    assert (
        await stack.metric("courier_notifications_total", channel="email", outcome="permanent") == 1
    )


async def test_email_sent_once_while_sms_retries_through_two_503s(
    stack: Stack, smtp_sink: SmtpSink, http_sink: HttpSink
) -> None:
    http_sink.fail_next(2, 503, path="/sms")
    await stack.register("ada@example.com", channels=["email", "sms"], phone="+14155552671")
    await eventually(lambda: len(http_sink.deliveries) == 1, timeout=20, what="the SMS")
    await stack.consumed("acked", 1)  # the third attempt, which sent the SMS, is settled
    assert len(smtp_sink.messages) == 1
    assert [r["status"] for r in http_sink.requests] == [503, 503, 202]
    assert len(http_sink.deliveries) == 1
    assert (
        await stack.metric("courier_notifications_total", channel="email", outcome="skipped") == 2
    )


async def test_rate_limited_sms_honours_retry_after(stack: Stack, http_sink: HttpSink) -> None:
    http_sink.fail_next(1, 429, path="/sms", retry_after=1)
    started = time.monotonic()
    await stack.register("ada@example.com", channels=["sms"], phone="+14155552671")
    await eventually(lambda: len(http_sink.deliveries) == 1, timeout=20, what="the SMS")
    assert time.monotonic() - started >= 1.0  # the 1.2 s tier, not the 0.3 s one


async def test_newly_enabled_channel_gets_a_confirmation_and_nothing_else(
    stack: Stack, smtp_sink: SmtpSink, http_sink: HttpSink
) -> None:
    user = await stack.register("ada@example.com")
    await wait_mail(smtp_sink, 1)
    patched = await stack.users.patch(
        f"/v1/users/{user['id']}", json={"channels": ["email", "push"], "push_token": "tok"}
    )
    assert patched.status_code == 200
    await eventually(lambda: len(http_sink.deliveries) == 1, what="the push confirmation")
    assert http_sink.deliveries[0]["body"]["title"] == "Notifications are on"
    renamed = await stack.users.patch(f"/v1/users/{user['id']}", json={"display_name": "Ada L"})
    assert renamed.status_code == 200
    await stack.consumed("acked", 2, event_type="user.updated")  # the rename, handled
    assert len(smtp_sink.messages) == 1
    assert len(http_sink.deliveries) == 1


async def test_a_deleted_user_gets_no_late_welcome(
    stack: Stack, smtp_sink: SmtpSink, http_sink: HttpSink
) -> None:
    http_sink.fail_next(1, 503, path="/sms")
    user = await stack.register("ada@example.com", channels=["sms"], phone="+14155552671")
    await eventually(lambda: len(http_sink.requests) == 1, what="the first SMS attempt")
    assert (await stack.users.delete(f"/v1/users/{user['id']}")).status_code == 204

    await stack.consumed("acked", 1)  # the retry came back after the erasure, and was acked
    assert http_sink.deliveries == []
    assert len(http_sink.requests) == 1  # the retry did not even try the provider


async def test_readiness_and_backlog_metrics(stack: Stack, amqp_url: str) -> None:
    async def ready() -> bool:
        response = await stack.notifier.get("/readyz")
        return bool(response.status_code == 200)

    await eventually(ready, what="the notifier to be ready")
    body = (await stack.notifier.get("/readyz")).json()
    assert body["consuming"] is True
    assert body["broker"] == "connected"

    async def consumers_seen() -> bool:
        value = await stack.metric("courier_queue_consumers", queue=USER_EVENTS_QUEUE)
        return bool(value == 1)

    await eventually(consumers_seen, timeout=30, interval=0.5, what="the backlog gauges")
