"""The SDK set-up from env, failed spans, operation spans and the current trace ids."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
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
    current_trace_ids,
    init_tracing,
    operation_span,
    record_failure,
)
from courier_testing.otlp import TraceReceiver, otlp_receiver

EMAIL = "alice.smith@example.com"
TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7


# --- failures, operation spans ----------------------------------------------------------------


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
