"""One trace from publish to process, carried in AMQP headers."""

from __future__ import annotations

import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, StatusCode, TraceFlags, Tracer

from courier_common.messaging.tracing import (
    extract_context,
    inject_context,
    link_from_headers,
    process_span,
    publish_span,
)
from courier_common.tracing import PROPAGATION_HEADERS

EMAIL = "alice.smith@example.com"
MESSAGE_ID = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7


def parent_of(context: Context) -> SpanContext:
    return trace.get_current_span(context).get_span_context()


def by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {span.name: span for span in exporter.get_finished_spans()}


# --- header carriers --------------------------------------------------------------------------


def test_inject_then_extract_keeps_trace_id_and_parent_span_id(
    spans: tuple[Tracer, InMemorySpanExporter],
) -> None:
    tracer, _ = spans
    headers: dict[str, object] = {"x-courier-attempt": 2}

    with tracer.start_as_current_span("outbox_relay") as span:
        returned = inject_context(headers)

    assert returned is headers
    assert headers["x-courier-attempt"] == 2
    assert isinstance(headers["traceparent"], str)
    extracted = parent_of(extract_context(headers))
    assert extracted.trace_id == span.get_span_context().trace_id
    assert extracted.span_id == span.get_span_context().span_id
    assert extracted.is_remote


def test_inject_uses_an_explicit_context_and_keeps_tracestate() -> None:
    incoming = extract_context({"traceparent": TRACEPARENT, "tracestate": "congo=t61rcWkgMzE"})

    headers: dict[str, object] = inject_context({}, context=incoming)

    assert headers == {"traceparent": TRACEPARENT, "tracestate": "congo=t61rcWkgMzE"}


def test_bytes_header_values_are_read() -> None:
    context = extract_context(
        {"traceparent": TRACEPARENT.encode(), "tracestate": b"congo=t61rcWkgMzE"}
    )

    parent = parent_of(context)
    assert parent.trace_id == TRACE_ID
    assert parent.span_id == SPAN_ID
    assert parent.trace_flags.sampled
    assert parent.trace_state.get("congo") == "t61rcWkgMzE"


@pytest.mark.parametrize(
    "value",
    [
        "garbage",
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e4736",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
        b"\xff\xfe\x00garbage",  # not UTF-8
        42,
        None,
        ["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"],
        {"nested": "table"},
    ],
)
def test_malformed_traceparent_gives_an_empty_context(value: object) -> None:
    context = extract_context({"traceparent": value, "tracestate": "\x00\x01 junk"})

    assert not parent_of(context).is_valid
    assert context == Context()


@pytest.mark.parametrize("headers", [None, {}])
def test_missing_headers_give_an_empty_context(headers: dict[str, object] | None) -> None:
    assert extract_context(headers) == Context()


# --- messaging spans --------------------------------------------------------------------------


def test_publish_then_process_form_one_trace(
    spans: tuple[Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = spans
    headers: dict[str, object] = {}

    with publish_span(
        tracer,
        exchange="courier.events",
        routing_key="user.registered",
        message_id=MESSAGE_ID,
        body_size=321,
    ):
        inject_context(headers)

    # The consumer loop has its own span active; the message's parent must still be the publish.
    with (
        tracer.start_as_current_span("consumer_loop"),
        process_span(
            tracer,
            queue="courier.test.work",
            headers=headers,
            message_id=MESSAGE_ID,
            routing_key="user.registered",
            exchange="courier.events",
            body_size=321,
        ),
    ):
        pass

    finished = by_name(exporter)
    publish = finished["publish courier.events"]
    process = finished["process courier.test.work"]
    assert publish.kind is SpanKind.PRODUCER
    assert process.kind is SpanKind.CONSUMER
    assert publish.parent is None
    assert process.context.trace_id == publish.context.trace_id
    assert process.parent is not None
    assert process.parent.span_id == publish.context.span_id
    assert process.parent.is_remote
    assert dict(publish.attributes or {}) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": "courier.events:user.registered",
        "messaging.rabbitmq.destination.routing_key": "user.registered",
        "messaging.message.id": MESSAGE_ID,
        "messaging.message.body.size": 321,
    }
    assert dict(process.attributes or {}) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "courier.events:user.registered:courier.test.work",
        "messaging.rabbitmq.destination.routing_key": "user.registered",
        "messaging.message.id": MESSAGE_ID,
        "messaging.message.body.size": 321,
    }
    assert publish.status.status_code is StatusCode.UNSET
    assert process.status.status_code is StatusCode.UNSET


@pytest.mark.parametrize(
    ("exchange", "routing_key", "span_name", "destination"),
    [
        ("courier.events", "user.updated", "publish courier.events", "courier.events:user.updated"),
        ("courier.dlx", "", "publish courier.dlx", "courier.dlx"),
        (
            "",
            "courier.test.work.retry.30s",
            "publish courier.test.work.retry.30s",
            "courier.test.work.retry.30s",
        ),
        ("", "", "publish amq.default", "amq.default"),
    ],
)
def test_publish_span_names_its_destination(
    spans: tuple[Tracer, InMemorySpanExporter],
    exchange: str,
    routing_key: str,
    span_name: str,
    destination: str,
) -> None:
    tracer, exporter = spans

    with publish_span(tracer, exchange=exchange, routing_key=routing_key, message_id=None):
        pass

    (span,) = exporter.get_finished_spans()
    attributes = dict(span.attributes or {})
    assert span.name == span_name
    assert attributes["messaging.destination.name"] == destination
    assert attributes.get("messaging.rabbitmq.destination.routing_key") == (routing_key or None)
    assert "messaging.message.id" not in attributes
    assert "messaging.message.body.size" not in attributes


def test_publish_span_with_send_operation_and_server_attributes(
    spans: tuple[Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = spans

    with publish_span(
        tracer,
        exchange="courier.dlx",
        routing_key="user.registered",
        message_id=MESSAGE_ID,
        body_size=0,
        conversation_id="corr-7",
        server_address="rabbitmq",
        server_port=5672,
        operation_name="send",
    ):
        pass

    (span,) = exporter.get_finished_spans()
    assert span.name == "send courier.dlx"
    assert dict(span.attributes or {}) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": "courier.dlx:user.registered",
        "messaging.rabbitmq.destination.routing_key": "user.registered",
        "messaging.message.id": MESSAGE_ID,
        "messaging.message.conversation_id": "corr-7",
        "messaging.message.body.size": 0,
        "server.address": "rabbitmq",
        "server.port": 5672,
    }


def test_process_span_for_a_queue_fed_by_the_default_exchange(
    spans: tuple[Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = spans

    with process_span(
        tracer,
        queue="courier.dead-letters",
        headers=None,
        message_id=None,
        routing_key="courier.dead-letters",
        exchange="",
        body_size=None,
    ):
        pass

    (span,) = exporter.get_finished_spans()
    assert span.name == "process courier.dead-letters"
    assert span.parent is None
    assert dict(span.attributes or {})["messaging.destination.name"] == "courier.dead-letters"


def test_process_span_with_malformed_headers_starts_a_new_trace(
    spans: tuple[Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = spans

    with process_span(
        tracer,
        queue="courier.test.work",
        headers={"traceparent": b"\x00not-a-traceparent"},
        message_id=MESSAGE_ID,
        routing_key="user.registered",
        exchange="courier.events",
        body_size=10,
    ):
        pass

    (span,) = exporter.get_finished_spans()
    assert span.parent is None
    assert span.context.is_valid


def test_process_span_makes_the_messages_baggage_current_and_keeps_links(
    spans: tuple[Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = spans
    token = otel_context.attach(baggage.set_baggage("courier.replay_id", "rp-1"))
    try:
        headers: dict[str, object] = inject_context({})
    finally:
        otel_context.detach(token)
    original = SpanContext(TRACE_ID, SPAN_ID, is_remote=True, trace_flags=TraceFlags(1))

    with process_span(
        tracer,
        queue="courier.test.work",
        headers=headers,
        message_id=MESSAGE_ID,
        routing_key="user.registered",
        exchange="courier.events",
        body_size=10,
        links=[Link(original)],
    ):
        seen = baggage.get_baggage("courier.replay_id")

    assert seen == "rp-1"
    assert baggage.get_baggage("courier.replay_id") is None  # detached again
    (span,) = exporter.get_finished_spans()
    assert [link.context for link in span.links] == [original]


class SmtpRejectedError(Exception):
    """A permanent failure whose message quotes the recipient, as SMTP 550 replies do."""


def test_failure_in_a_span_records_error_type_status_and_a_scrubbed_exception(
    spans: tuple[Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = spans

    with (
        pytest.raises(SmtpRejectedError),
        process_span(
            tracer,
            queue="courier.test.work",
            headers=None,
            message_id=MESSAGE_ID,
            routing_key="user.registered",
            exchange="courier.events",
            body_size=10,
        ),
    ):
        raise SmtpRejectedError(f"550 5.1.1 <{EMAIL}>: Recipient address rejected")

    (span,) = exporter.get_finished_spans()
    expected_type = f"{SmtpRejectedError.__module__}.SmtpRejectedError"
    assert span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes or {})["error.type"] == expected_type
    (event,) = span.events
    event_attributes = dict(event.attributes or {})
    assert event.name == "exception"
    assert event_attributes["exception.type"] == expected_type
    assert event_attributes["exception.message"] == (
        "550 5.1.1 <a***@e***.com>: Recipient address rejected"
    )
    assert EMAIL not in str(event_attributes["exception.stacktrace"])
    assert EMAIL not in (span.status.description or "")


def test_builtin_exceptions_use_their_plain_name_as_error_type(
    spans: tuple[Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = spans

    with (
        pytest.raises(KeyError),
        publish_span(tracer, exchange="courier.events", routing_key="user.x", message_id=None),
    ):
        raise KeyError("schema")

    (span,) = exporter.get_finished_spans()
    assert dict(span.attributes or {})["error.type"] == "KeyError"


# --- links and propagation headers ------------------------------------------------------------


def test_link_from_headers_points_at_the_messages_context() -> None:
    link = link_from_headers(
        {"traceparent": TRACEPARENT.encode()}, {"courier.link.relation": "replay_of"}
    )

    assert link is not None
    assert link.context.trace_id == TRACE_ID
    assert link.context.span_id == SPAN_ID
    assert dict(link.attributes or {}) == {"courier.link.relation": "replay_of"}


@pytest.mark.parametrize("headers", [None, {}, {"traceparent": "garbage"}])
def test_link_from_headers_without_a_context_is_none(headers: dict[str, object] | None) -> None:
    assert link_from_headers(headers) is None


def test_propagation_headers_name_what_inject_writes(
    spans: tuple[Tracer, InMemorySpanExporter],
) -> None:
    tracer, _ = spans
    token = otel_context.attach(baggage.set_baggage("k", "v"))
    try:
        with tracer.start_as_current_span("s"):
            headers: dict[str, object] = inject_context({})
    finally:
        otel_context.detach(token)

    assert set(headers) <= PROPAGATION_HEADERS
    assert {"traceparent", "tracestate", "baggage"} <= PROPAGATION_HEADERS
