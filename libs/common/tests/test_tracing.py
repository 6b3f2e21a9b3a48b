"""One trace from publish to process, carried in AMQP headers; and the SDK set-up from env."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
    Tracer,
    format_span_id,
    format_trace_id,
)

from courier_common.tracing import (
    PROPAGATION_HEADERS,
    current_trace_ids,
    extract_context,
    init_tracing,
    inject_context,
    link_from_headers,
    operation_span,
    process_span,
    publish_span,
    record_failure,
)
from tests.support.otlp import TraceReceiver, otlp_receiver

EMAIL = "alice.smith@example.com"
MESSAGE_ID = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7


@pytest.fixture
def spans() -> Iterator[tuple[Tracer, InMemorySpanExporter]]:
    """A private provider, so these tests neither need nor disturb the global one."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("courier.test"), exporter
    provider.shutdown()


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
            queue="notification.user-events",
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
    process = finished["process notification.user-events"]
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
        "messaging.destination.name": "courier.events:user.registered:notification.user-events",
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
            "notification.user-events.retry.30s",
            "publish notification.user-events.retry.30s",
            "notification.user-events.retry.30s",
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
        queue="notification.user-events",
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
        queue="notification.user-events",
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
            queue="notification.user-events",
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


def test_record_failure_takes_an_explicit_error_type(
    spans: tuple[Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = spans

    with tracer.start_as_current_span("send_sms") as span:
        record_failure(span, TimeoutError("provider timed out"), error_type="sms_timeout")

    (finished,) = exporter.get_finished_spans()
    assert finished.status.status_code is StatusCode.ERROR
    assert finished.status.description == "provider timed out"
    assert dict(finished.attributes or {})["error.type"] == "sms_timeout"
    assert finished.events[0].name == "exception"


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


# --- other spans, links ----------------------------------------------------------------------


def test_operation_span_is_current_with_its_kind_attributes_and_links(
    spans: tuple[Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = spans
    original = SpanContext(TRACE_ID, SPAN_ID, is_remote=True, trace_flags=TraceFlags(1))

    with (
        tracer.start_as_current_span("consume") as parent,
        operation_span(
            tracer,
            "send sms",
            kind=SpanKind.CLIENT,
            attributes={"courier.notification.channel": "sms", "server.port": 443},
            links=[Link(original)],
        ) as span,
    ):
        assert trace.get_current_span() is span
        span.set_attribute("courier.notification.outcome", "sent")

    (finished,) = [s for s in exporter.get_finished_spans() if s.name == "send sms"]
    assert finished.kind is SpanKind.CLIENT
    assert finished.parent is not None
    assert finished.parent.span_id == parent.get_span_context().span_id
    assert dict(finished.attributes or {}) == {
        "courier.notification.channel": "sms",
        "server.port": 443,
        "courier.notification.outcome": "sent",
    }
    assert [link.context for link in finished.links] == [original]
    assert finished.status.status_code is StatusCode.UNSET


def test_operation_span_names_a_failure_with_the_error_type_callback(
    spans: tuple[Tracer, InMemorySpanExporter],
) -> None:
    tracer, exporter = spans

    def error_type(exc: BaseException) -> str | None:
        return "503" if isinstance(exc, ConnectionError) else None

    with pytest.raises(ConnectionError), operation_span(tracer, "a", error_type=error_type):
        raise ConnectionError(f"provider refused {EMAIL}")
    with pytest.raises(KeyError), operation_span(tracer, "b", error_type=error_type):
        raise KeyError("no callback answer: the class name")

    first, second = exporter.get_finished_spans()
    assert first.kind is SpanKind.INTERNAL
    assert dict(first.attributes or {})["error.type"] == "503"
    assert first.status.status_code is StatusCode.ERROR
    assert EMAIL not in (first.status.description or "")
    assert len(first.events) == 1  # recorded once, by record_failure, not again by the SDK
    assert dict(second.attributes or {})["error.type"] == "KeyError"


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


# --- current ids ------------------------------------------------------------------------------


def test_current_trace_ids_inside_and_outside_a_span(
    spans: tuple[Tracer, InMemorySpanExporter],
) -> None:
    tracer, _ = spans
    assert current_trace_ids() is None

    with tracer.start_as_current_span("handle") as span:
        ids = current_trace_ids()

    context = span.get_span_context()
    assert ids == (format_trace_id(context.trace_id), format_span_id(context.span_id))


def test_current_trace_ids_skip_unsampled_spans_but_keep_sampled_remote_ones() -> None:
    unsampled = TracerProvider(sampler=ALWAYS_OFF).get_tracer("test")
    with unsampled.start_as_current_span("dropped"):
        assert current_trace_ids() is None

    remote = SpanContext(TRACE_ID, SPAN_ID, is_remote=True, trace_flags=TraceFlags(1))
    with trace.use_span(NonRecordingSpan(remote)):
        assert current_trace_ids() == (
            "4bf92f3577b34da6a3ce929d0e0e4736",
            "00f067aa0ba902b7",
        )


# --- init_tracing -----------------------------------------------------------------------------


def test_init_tracing_when_sdk_disabled_installs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    before = trace.get_tracer_provider()

    assert init_tracing("user-service") is None
    assert trace.get_tracer_provider() is before


def _clean_env(**extra: str) -> dict[str, str]:
    """The parent's environment without OTel settings or proxies that would steer the child."""
    proxies = {"http_proxy", "https_proxy", "grpc_proxy", "all_proxy"}
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("OTEL_") and key.lower() not in proxies
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


def _run_python(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def otlp() -> Iterator[tuple[TraceReceiver, int]]:
    with otlp_receiver() as served:
        yield served


def test_init_tracing_exports_over_otlp_grpc(otlp: tuple[TraceReceiver, int]) -> None:
    # A subprocess, because a process can install its global tracer provider only once.
    receiver, port = otlp
    script = """
        from courier_common.tracing import (
            current_trace_ids, get_tracer, init_tracing, shutdown_tracing,
        )

        provider = init_tracing("courier-otlp-test", resource_attributes={"team": "courier"})
        assert provider is not None
        with get_tracer("smoke").start_as_current_span("otlp-smoke"):
            print(current_trace_ids()[0])
        shutdown_tracing(provider)
    """
    env = _clean_env(
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
        OTEL_EXPORTER_OTLP_INSECURE="true",
    )

    result = _run_python(script, env)

    trace_id = result.stdout.strip().splitlines()[-1]
    received = {(span.service, span.name, span.trace_id) for span in receiver.spans()}
    assert ("courier-otlp-test", "otlp-smoke", trace_id) in received


def test_init_tracing_twice_keeps_the_first_provider_and_honours_otel_service_name() -> None:
    script = """
        from opentelemetry import trace
        from courier_common.tracing import current_trace_ids, get_tracer, init_tracing

        tracer = get_tracer("early")  # taken before init, as module-level tracers are
        first = init_tracing("user-service")
        second = init_tracing("notification-service")

        assert first is not None, "first call installs a provider"
        assert second is None, "second call installs nothing"
        assert trace.get_tracer_provider() is first
        assert first.resource.attributes["service.name"] == "from-env"
        with tracer.start_as_current_span("no-exporter"):
            assert current_trace_ids() is not None, "spans get ids without an exporter"
    """

    result = _run_python(script, _clean_env(OTEL_SERVICE_NAME="from-env"))

    assert "tracer_provider_already_installed" in result.stdout + result.stderr


def test_console_exporter_writes_spans_to_stderr_not_stdout() -> None:
    script = """
        from courier_common.tracing import get_tracer, init_tracing, shutdown_tracing

        provider = init_tracing("console-test")
        with get_tracer("t").start_as_current_span("console-span"):
            pass
        shutdown_tracing(provider)
    """

    result = _run_python(script, _clean_env(OTEL_TRACES_EXPORTER="console"))

    assert '"name": "console-span"' in result.stderr
    assert "console-span" not in result.stdout
