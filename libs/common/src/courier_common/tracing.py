"""Tracing for Courier: the OpenTelemetry SDK set up from ``OTEL_*``, and failures on spans.

One trace has to run from ``POST /v1/users`` through the outbox relay, the publish, every consume
and retry, to the dead-letter archive. `init_tracing` installs the SDK the way every Courier
process needs it (W3C propagation whatever the environment says, no exporter unless one is
configured); `record_failure` and `operation_span` mark failed spans with a low-cardinality
``error.type`` and a scrubbed exception event, so a span never carries an email in clear. HTTP
spans come from instrumentation; the AMQP side (trace context in message headers, publish and
process spans) is `courier_common.messaging.tracing`.

Attribute names come from ``opentelemetry.semconv``; the generic ones used across Courier are
named here once.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Final

from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagate import set_global_textmap
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.semconv.attributes import error_attributes as _error
from opentelemetry.semconv.attributes import server_attributes as _server
from opentelemetry.semconv.attributes import service_attributes as _service
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from courier_common.logging import current_trace_ids, get_logger
from courier_common.pii import scrub_text

__all__ = [
    "current_trace_ids",
    "get_tracer",
    "init_tracing",
    "operation_span",
    "record_failure",
    "shutdown_tracing",
]

_log = get_logger(__name__)

# --- semantic-convention names ---------------------------------------------------------------
SERVER_ADDRESS: Final = _server.SERVER_ADDRESS
SERVER_PORT: Final = _server.SERVER_PORT
ERROR_TYPE: Final = _error.ERROR_TYPE
SERVICE_NAME: Final = _service.SERVICE_NAME

# Exception-event attributes, overridden with scrubbed text in record_failure.
_EXCEPTION_MESSAGE: Final = "exception.message"
_EXCEPTION_STACKTRACE: Final = "exception.stacktrace"

_TRUE_VALUES: Final = frozenset({"true", "1", "yes", "on"})

# W3C TraceContext + Baggage, whatever OTEL_PROPAGATORS says: the headers are a message contract.
_PROPAGATOR: Final = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
#: The headers trace propagation writes (``traceparent``, ``tracestate``, ``baggage``). Drop them
#: from headers copied off an old message that is published anew in another trace (a replay):
#: `courier_common.messaging.tracing.inject_context` always overwrites ``traceparent`` but
#: writes the other two only when the current context has them, so stale ones would ride along.
PROPAGATION_HEADERS: Final = frozenset(_PROPAGATOR.fields)


# --------------------------------------------------------------------------------------------
# SDK set-up
# --------------------------------------------------------------------------------------------


def _env(name: str) -> str | None:
    """An ``OTEL_*`` variable, with empty meaning unset (charts often render ``VAR: ""``)."""
    value = os.environ.get(name, "").strip()
    return value or None


def _otlp_exporter() -> SpanExporter:
    protocol = _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or _env("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol is not None and protocol != "grpc":
        _log.warning("otlp_protocol_unsupported", protocol=protocol, using="grpc")
    # Imported here: grpc is slow to import and processes that export nothing never need it.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    # Endpoint, headers, TLS, timeout and compression come from OTEL_EXPORTER_OTLP_* directly.
    return OTLPSpanExporter()


def _exporters_from_env() -> list[SpanExporter]:
    """Pick span exporters the way the ``OTEL_*`` variables ask, with a quieter default.

    An explicit ``OTEL_TRACES_EXPORTER`` list decides. Without it we export over OTLP only when an
    endpoint is configured — unlike the SDK's default of "otlp to localhost:4317", which makes
    every laptop run and test retry a collector that is not there. With no exporter, spans are
    still created, so log lines and dead letters still carry trace ids.
    """
    configured = _env("OTEL_TRACES_EXPORTER")
    if configured is None:
        has_endpoint = _env("OTEL_EXPORTER_OTLP_ENDPOINT") or _env(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        )
        names = ["otlp"] if has_endpoint else []
    else:
        names = [name.strip().lower() for name in configured.split(",") if name.strip()]
        if "none" in names:
            return []
    exporters: list[SpanExporter] = []
    for name in dict.fromkeys(names):
        if name == "otlp":
            exporters.append(_otlp_exporter())
        elif name == "console":
            # stderr: stdout carries the JSON log lines, which multi-line span dumps would break.
            exporters.append(ConsoleSpanExporter(out=sys.stderr))
        else:
            _log.warning("traces_exporter_unsupported", exporter=name)
    return exporters


def init_tracing(
    service_name: str,
    *,
    resource_attributes: Mapping[str, str] | None = None,
) -> TracerProvider | None:
    """Install the OpenTelemetry SDK as the process-wide tracer provider, configured from env.

    ``OTEL_SERVICE_NAME`` overrides *service_name*; ``OTEL_RESOURCE_ATTRIBUTES``,
    ``OTEL_TRACES_SAMPLER`` and the ``OTEL_EXPORTER_OTLP_*`` variables are honoured by the SDK.
    The propagator is always set to W3C TraceContext + Baggage, whatever ``OTEL_PROPAGATORS``
    says, because ``traceparent``/``tracestate`` headers are part of Courier's message contract.

    Returns the provider this call installed — the caller owns it and passes it to
    `shutdown_tracing` on the way out — or None when it installed nothing:

    * ``OTEL_SDK_DISABLED=true``: the API's no-op provider stays; context still propagates.
    * a tracer provider was already installed (a second call, a test that installed its own with
      an in-memory exporter, or auto-instrumentation): OpenTelemetry refuses to replace a global
      provider, so rather than build a second one whose spans would go nowhere, this keeps the
      existing one, logs a warning, and leaves its shutdown to whoever installed it.
    """
    set_global_textmap(_PROPAGATOR)
    if (_env("OTEL_SDK_DISABLED") or "").lower() in _TRUE_VALUES:
        return None

    installed = trace.get_tracer_provider()
    if not isinstance(installed, trace.ProxyTracerProvider):
        _log.warning(
            "tracer_provider_already_installed",
            provider=type(installed).__qualname__,
            requested_service=service_name,
        )
        return None

    attributes: dict[str, AttributeValue] = dict(resource_attributes or {})
    attributes[SERVICE_NAME] = _env("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create(attributes))
    for exporter in _exporters_from_env():
        provider.add_span_processor(BatchSpanProcessor(exporter))

    trace.set_tracer_provider(provider)
    if trace.get_tracer_provider() is not provider:
        # Another thread won the race to install one; ours would never see a span.
        provider.shutdown()
        return None
    return provider


def shutdown_tracing(provider: TracerProvider | None) -> None:
    """Flush buffered spans and stop the exporters of a provider from `init_tracing`.

    Call it when the process stops (lifespan shutdown), or the last batch of spans — often the
    interesting ones — is lost. The provider stays installed (OpenTelemetry cannot uninstall one);
    spans started afterwards are dropped. Accepts None so ``shutdown_tracing(init_tracing(...))``
    pairs up whatever init returned.
    """
    if provider is not None:
        provider.shutdown()


def get_tracer(name: str) -> Tracer:
    """Return a tracer from the global provider; safe to call at import time.

    Before `init_tracing` runs this is a proxy that starts using the SDK once it is installed.
    """
    return trace.get_tracer(name)


# --------------------------------------------------------------------------------------------
# Failures and operation spans
# --------------------------------------------------------------------------------------------


def _error_type_of(exc: BaseException) -> str:
    """The exception's canonical class name, as ``error.type`` asks for."""
    cls = type(exc)
    if cls.__module__ in ("builtins", "__main__"):
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def record_failure(span: Span, exc: BaseException, *, error_type: str | None = None) -> None:
    """Mark *span* failed: status ERROR, ``error.type``, and an exception event.

    Exception messages regularly quote the address a send failed for (an SMTP 550 names the
    recipient), and spans leave the process too, so the message and stack trace on the event and
    the status are scrubbed like log lines. Pass *error_type* for a low-cardinality reason (for
    example ``"smtp_permanent"``) instead of the class name.
    """
    message = scrub_text(str(exc))
    stacktrace = scrub_text("".join(traceback.format_exception(exc)))
    span.set_attribute(ERROR_TYPE, error_type or _error_type_of(exc))
    span.record_exception(
        exc,
        attributes={_EXCEPTION_MESSAGE: message, _EXCEPTION_STACKTRACE: stacktrace},
    )
    span.set_status(Status(StatusCode.ERROR, message or type(exc).__qualname__))


@contextmanager
def operation_span(
    tracer: Tracer,
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, AttributeValue] | None = None,
    links: Sequence[Link] = (),
    error_type: Callable[[BaseException], str | None] | None = None,
) -> Iterator[Span]:
    """A current span around one operation whose failures go through `record_failure`.

    The SDK's own exception handling is switched off: an exception leaving the block marks the
    span failed with a scrubbed exception event and a low-cardinality ``error.type`` — what
    *error_type* returns for it, or the exception's class name when that is None — and
    propagates. Use it for spans that are not messaging spans (a notification send, a replay).
    """
    with tracer.start_as_current_span(
        name,
        kind=kind,
        attributes=dict(attributes) if attributes else None,
        links=links,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except BaseException as exc:
            record_failure(span, exc, error_type=error_type(exc) if error_type else None)
            raise
