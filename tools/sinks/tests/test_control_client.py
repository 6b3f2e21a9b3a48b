"""`SinkControl` drives either sink through the same methods."""

from __future__ import annotations

import threading
from email.message import EmailMessage

import aiosmtplib
import httpx
import pytest

from courier_sinks import HttpSink, SinkControl, SmtpSink


async def test_smtp_records_wait_for_and_clear(
    smtp_sink: SmtpSink, smtp_control: SinkControl
) -> None:
    message = EmailMessage()
    message["From"] = "noreply@courier.test"
    message["To"] = "ada@example.com"
    message["Subject"] = "Hi"
    message.set_content("hi")
    await aiosmtplib.send(message, hostname="127.0.0.1", port=smtp_sink.port)

    [found] = smtp_control.wait_for(1, timeout=2, to="ada@example.com")
    assert found["subject"] == "Hi"
    assert smtp_control.records() == smtp_control.messages()
    smtp_control.clear()
    assert smtp_control.messages() == []


def test_http_wait_for_sees_a_late_request(http_sink: HttpSink, http_control: SinkControl) -> None:
    timer = threading.Timer(0.3, lambda: httpx.post(f"{http_sink.url}/push", json={"n": 1}))
    timer.start()
    try:
        [found] = http_control.wait_for(1, timeout=5, path="/push")
    finally:
        timer.join()
    assert found["body"] == {"n": 1}


def test_wait_for_times_out_with_the_count(http_control: SinkControl) -> None:
    with pytest.raises(TimeoutError, match="expected 2 record"):
        http_control.wait_for(2, timeout=0.2)


def test_http_failure_switch_round_trip(http_sink: HttpSink, http_control: SinkControl) -> None:
    state = http_control.fail_next(3, status=429, path="/sms", retry_after=2)
    assert state == {
        "armed": True,
        "remaining": 3,
        "used": 0,
        "status": 429,
        "path": "/sms",
        "retry_after": 2,
        "delay_ms": 0,
        "message": None,
    }
    assert http_control.delay_next(1, 50, path="/push")["status"] is None
    http_control.clear_failures()
    assert http_control.failure() == {"armed": False, "remaining": 0, "used": 0}
    assert httpx.post(f"{http_sink.url}/sms", json={}).status_code == 202

    http_control.clear()
    assert http_control.requests() == []


def test_a_bad_spec_raises_with_the_reason(smtp_control: SinkControl) -> None:
    with pytest.raises(httpx.HTTPStatusError) as error:
        smtp_control.fail_next(1)  # an SMTP failure needs its reply code
    assert error.value.response.status_code == 422
    assert "code is required" in error.value.response.json()["message"]


def test_in_process_wait_times_out(smtp_sink: SmtpSink) -> None:
    with pytest.raises(TimeoutError, match="got 0"):
        smtp_sink.wait_for_messages(1, timeout=0.1)
