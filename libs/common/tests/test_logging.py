"""What an operator reads: the lines `configure_logging` writes to stdout."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
import uuid
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import format_span_id, format_trace_id

from courier_common.logging import configure_logging, get_logger

EMAIL = "alice.smith@example.com"
MASKED_EMAIL = "a***@e***.com"
PHONE = "+14155552671"
MASKED_PHONE = "+1*******671"

_TOUCHED_LOGGERS = (
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "aio_pika",
    "aiormq",
    "httpx",
    "httpcore",
    "courier",
)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Put the stdlib and structlog configuration back the way the test found it."""
    root = logging.getLogger()
    root_handlers, root_level = list(root.handlers), root.level
    structlog_config = structlog.get_config()
    saved = {
        name: (lg.level, lg.propagate, list(lg.handlers))
        for name in _TOUCHED_LOGGERS
        for lg in [logging.getLogger(name)]
    }
    yield
    for handler in list(root.handlers):
        if handler not in root_handlers:
            root.removeHandler(handler)
            handler.close()
    root.handlers[:] = root_handlers  # configure_logging replaced the session's handler
    root.setLevel(root_level)
    for name, (level, propagate, handlers) in saved.items():
        lg = logging.getLogger(name)
        lg.setLevel(level)
        lg.propagate = propagate
        lg.handlers[:] = handlers
    structlog.contextvars.clear_contextvars()
    # Back to what the session had (not structlog's defaults): later test files log through it.
    structlog.configure(**structlog_config)


def json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def only_line(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    lines = json_lines(capsys.readouterr().out)
    assert len(lines) == 1, lines
    return lines[0]


# --- one write per loop turn ------------------------------------------------------------------


class CountingStream(io.StringIO):
    """stdout that counts its writes."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def counting_stdout(monkeypatch: pytest.MonkeyPatch) -> CountingStream:
    """A stdout that counts its writes, with Courier's logging configured onto it (set in the
    test itself: pytest's capture replaces sys.stdout between a fixture and its test)."""
    stream = CountingStream()
    monkeypatch.setattr(sys, "stdout", stream)
    configure_logging(fmt="json")
    return stream


async def test_lines_of_one_loop_turn_leave_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    stdout = counting_stdout(monkeypatch)
    log = get_logger("courier.test")
    for i in range(5):
        log.info("handled", n=i)
    assert stdout.getvalue() == ""  # still this turn
    await asyncio.sleep(0)
    assert [line["n"] for line in json_lines(stdout.getvalue())] == [0, 1, 2, 3, 4]
    assert stdout.writes == 1


async def test_a_warning_is_written_at_once_after_what_was_pending(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stdout = counting_stdout(monkeypatch)
    log = get_logger("courier.test")
    log.info("first")
    log.warning("second")
    assert [line["event"] for line in json_lines(stdout.getvalue())] == ["first", "second"]


async def test_shutdown_writes_what_is_pending(monkeypatch: pytest.MonkeyPatch) -> None:
    stdout = counting_stdout(monkeypatch)
    get_logger("courier.test").info("last words")
    assert stdout.getvalue() == ""
    ours = [
        weakref.ref(h) for h in logging.getLogger().handlers if getattr(h, "stream", None) is stdout
    ]
    assert len(ours) == 1
    logging.shutdown(ours)  # what the interpreter runs at exit, for our handler alone
    assert [line["event"] for line in json_lines(stdout.getvalue())] == ["last words"]


def test_without_a_running_loop_every_line_is_written_at_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(fmt="json")
    get_logger("courier.test").info("sync")
    assert only_line(capsys)["event"] == "sync"


# --- trace correlation ------------------------------------------------------------------------


def test_json_line_inside_a_span_carries_that_spans_ids(
    capsys: pytest.CaptureFixture[str],
) -> None:
    tracer = TracerProvider().get_tracer("test")
    configure_logging(fmt="json", service="user-service")

    with tracer.start_as_current_span("register") as span:
        get_logger("courier.test").info("user_registered", event_id="evt-1")

    line = only_line(capsys)
    context = span.get_span_context()
    assert line["trace_id"] == format_trace_id(context.trace_id)
    assert line["span_id"] == format_span_id(context.span_id)
    assert len(line["trace_id"]) == 32
    assert len(line["span_id"]) == 16
    assert line["event"] == "user_registered"
    assert line["event_id"] == "evt-1"
    assert line["level"] == "info"
    assert line["logger"] == "courier.test"
    assert line["service"] == "user-service"
    assert line["timestamp"].endswith("Z")


def test_line_outside_any_span_has_no_trace_ids(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="json")

    get_logger("courier.test").info("started")

    line = only_line(capsys)
    assert "trace_id" not in line
    assert "span_id" not in line


def test_contextvars_are_merged_into_every_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="json")
    structlog.contextvars.bind_contextvars(event_id="evt-42")

    get_logger("courier.test").info("welcome_sent")
    logging.getLogger("aiormq").warning("connection lost")

    assert [line["event_id"] for line in json_lines(capsys.readouterr().out)] == [
        "evt-42",
        "evt-42",
    ]


# --- stdlib and third-party loggers -----------------------------------------------------------


def test_stdlib_uvicorn_error_comes_out_as_json_through_the_same_chain(
    capsys: pytest.CaptureFixture[str],
) -> None:
    tracer = TracerProvider().get_tracer("test")
    configure_logging(fmt="json", service="user-service")

    with tracer.start_as_current_span("request") as span:
        logging.getLogger("uvicorn.error").warning("Invalid HTTP request received from %s", EMAIL)

    line = only_line(capsys)
    assert line["event"] == f"Invalid HTTP request received from {MASKED_EMAIL}"
    assert line["level"] == "warning"
    assert line["logger"] == "uvicorn.error"
    assert line["service"] == "user-service"
    assert line["trace_id"] == format_trace_id(span.get_span_context().trace_id)
    assert line["timestamp"].endswith("Z")


def test_handlers_uvicorn_installed_are_replaced_by_the_one_root_handler(
    capsys: pytest.CaptureFixture[str],
) -> None:
    access = logging.getLogger("uvicorn.access")
    access.addHandler(logging.StreamHandler(sys.stdout))  # what uvicorn's dictConfig does
    access.propagate = False

    configure_logging(fmt="json")
    access.info('127.0.0.1:50000 - "GET /healthz HTTP/1.1" 200')

    line = only_line(capsys)
    assert line["logger"] == "uvicorn.access"
    assert line["event"] == '127.0.0.1:50000 - "GET /healthz HTTP/1.1" 200'


def test_chatty_libraries_are_held_at_warning_and_access_logs_at_info(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(fmt="json", level="DEBUG")

    logging.getLogger("aio_pika").info("channel opened")
    logging.getLogger("aiormq.connection").info("frame received")
    logging.getLogger("aio_pika.robust_connection").warning("reconnecting")
    logging.getLogger("httpx").info("HTTP Request: GET http://127.0.0.1:15672/api/queues")
    logging.getLogger("httpcore.connection").debug("connect_tcp.started")
    logging.getLogger("uvicorn.access").info("GET /v1/users 201")
    logging.getLogger("uvicorn.access").debug("noise")
    get_logger("courier.test").debug("debug_is_on")

    events = [line["event"] for line in json_lines(capsys.readouterr().out)]
    assert events == ["reconnecting", "GET /v1/users 201", "debug_is_on"]


def test_root_level_filters_structlog_and_stdlib_alike(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(fmt="json", level="warning")

    get_logger("courier.test").info("hidden")
    logging.getLogger("uvicorn.access").info("hidden too")
    get_logger("courier.test").warning("shown")

    assert [line["event"] for line in json_lines(capsys.readouterr().out)] == ["shown"]


def test_logger_levels_override_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="json", logger_levels={"aio_pika": "DEBUG"})

    logging.getLogger("aio_pika").debug("channel opened")

    assert only_line(capsys)["event"] == "channel opened"


def test_configuring_twice_does_not_double_lines(capsys: pytest.CaptureFixture[str]) -> None:
    log = get_logger("courier.test")  # created before configuration, as module loggers are
    configure_logging(fmt="console")
    configure_logging(fmt="json", service="dlq-archiver")

    log.info("once")
    logging.getLogger("uvicorn.error").info("once too")

    lines = json_lines(capsys.readouterr().out)
    assert [line["event"] for line in lines] == ["once", "once too"]
    assert {line["service"] for line in lines} == {"dlq-archiver"}


def test_format_defaults_to_json_when_stdout_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging()

    get_logger("courier.test").info("auto")

    assert only_line(capsys)["event"] == "auto"


def test_console_format_is_readable_and_still_scrubbed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(fmt="console")

    try:
        raise RuntimeError(f"550 mailbox unavailable: {EMAIL}")
    except RuntimeError:
        get_logger("courier.test").exception("welcome_failed", phone=PHONE)

    out = capsys.readouterr().out
    assert "welcome_failed" in out
    assert "RuntimeError" in out
    assert MASKED_EMAIL in out
    assert MASKED_PHONE in out
    assert EMAIL not in out
    assert PHONE not in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.splitlines()[0])


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging(level="LOUD")


# --- PII never in clear -----------------------------------------------------------------------


class _Recipient:
    def __repr__(self) -> str:
        return f"Recipient(email={EMAIL!r}, phone={PHONE!r})"


def _as_values(log: structlog.stdlib.BoundLogger) -> None:
    log.info("user_registered", email=EMAIL, phone=PHONE)


def _in_message(log: structlog.stdlib.BoundLogger) -> None:
    log.info(f"sending welcome to {EMAIL} and an SMS to {PHONE}")


def _as_positional_args(log: structlog.stdlib.BoundLogger) -> None:
    log.info("sending welcome to %s and an SMS to %s", EMAIL, PHONE)


def _nested(log: structlog.stdlib.BoundLogger) -> None:
    log.info(
        "payload_rejected",
        payload={"data": {"user": {"contact": [EMAIL, ("sms", PHONE)]}}},
    )


def _in_exception(log: structlog.stdlib.BoundLogger) -> None:
    try:
        raise ValueError(f"provider refused {EMAIL} / {PHONE}")
    except ValueError:
        log.exception("send_failed")


def _exception_as_value(log: structlog.stdlib.BoundLogger) -> None:
    log.warning("send_failed", error=ValueError(f"bad recipient {EMAIL} {PHONE}"))


def _object_repr(log: structlog.stdlib.BoundLogger) -> None:
    log.info("recipient_resolved", recipient=_Recipient())


def _stdlib_exception(_log: structlog.stdlib.BoundLogger) -> None:
    try:
        raise ConnectionError(f"SMTP 550 <{EMAIL}> rejected; fallback {PHONE}")
    except ConnectionError:
        logging.getLogger("aio_pika").error("delivery failed for %s", EMAIL, exc_info=True)


@pytest.mark.parametrize(
    "emit",
    [
        _as_values,
        _in_message,
        _as_positional_args,
        _nested,
        _in_exception,
        _exception_as_value,
        _object_repr,
        _stdlib_exception,
    ],
)
def test_email_and_phone_never_appear_in_clear(
    capsys: pytest.CaptureFixture[str], emit: Any
) -> None:
    configure_logging(fmt="json")

    emit(get_logger("courier.test"))

    out = capsys.readouterr().out
    assert out.strip()
    assert EMAIL not in out
    assert PHONE not in out
    assert "4155552671" not in out
    assert MASKED_EMAIL in out
    assert MASKED_PHONE in out


def test_scrubbing_does_not_modify_the_callers_data(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="json")
    payload = {"email": EMAIL, "tags": [PHONE]}

    get_logger("courier.test").info("payload", payload=payload)

    assert payload == {"email": EMAIL, "tags": [PHONE]}
    assert only_line(capsys)["payload"] == {"email": MASKED_EMAIL, "tags": [MASKED_PHONE]}


# A few values that look numeric or hex but are not contact details; test_pii has the catalogue.
_NOT_PII = {
    "occurred_at": "2024-05-01T12:34:56.789012+00:00",
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "peer": "10.244.120.134:5672",
    "amqp_url": "amqp://guest@rabbitmq:5672/",
}


def test_uuids_timestamps_hex_ids_and_counts_are_left_alone(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(fmt="json")
    event_uuid = uuid.UUID("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b")

    get_logger("courier.test").info(
        "message_acked",
        count=123456789012,
        duration_ms=12345678,
        lag_seconds=0.123456789,
        uuid_obj=event_uuid,
        **_NOT_PII,
    )

    line = only_line(capsys)
    assert line["count"] == 123456789012
    assert line["duration_ms"] == 12345678
    assert line["lag_seconds"] == 0.123456789
    assert line["uuid_obj"] == str(event_uuid)  # orjson renders a UUID as its text
    for key, value in _NOT_PII.items():
        assert line[key] == value, key
