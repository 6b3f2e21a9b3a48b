"""Tracing for Courier: SDK set-up from ``OTEL_*`` and trace context across RabbitMQ.

One trace has to run from ``POST /v1/users`` through the outbox relay, the publish, every consume
and retry, to the dead-letter archive. HTTP gets that from instrumentation; AMQP does not, so this
module carries W3C trace context in message headers and names messaging spans the way the OTel
messaging semantic conventions say, so any backend groups them correctly.

Attribute names come from ``opentelemetry.semconv`` where it has them. The messaging ones only
exist in its ``_incubating`` package (the messaging conventions are not stable yet), so they are
imported in one place below and nowhere else.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any, Final, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagate import extract, inject, set_global_textmap
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.semconv._incubating.attributes import messaging_attributes as _messaging
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
    "extract_context",
    "get_tracer",
    "init_tracing",
    "inject_context",
    "link_from_headers",
    "operation_span",
    "process_span",
    "publish_span",
    "record_failure",
    "shutdown_tracing",
]

_log = get_logger(__name__)

# --- semantic-convention names: the only place they are spelled -----------------------------
MESSAGING_SYSTEM: Final = _messaging.MESSAGING_SYSTEM
MESSAGING_OPERATION_TYPE: Final = _messaging.MESSAGING_OPERATION_TYPE
MESSAGING_OPERATION_NAME: Final = _messaging.MESSAGING_OPERATION_NAME
MESSAGING_DESTINATION_NAME: Final = _messaging.MESSAGING_DESTINATION_NAME
MESSAGING_ROUTING_KEY: Final = _messaging.MESSAGING_RABBITMQ_DESTINATION_ROUTING_KEY
MESSAGING_MESSAGE_ID: Final = _messaging.MESSAGING_MESSAGE_ID
MESSAGING_CONVERSATION_ID: Final = _messaging.MESSAGING_MESSAGE_CONVERSATION_ID
MESSAGING_BODY_SIZE: Final = _messaging.MESSAGING_MESSAGE_BODY_SIZE
SERVER_ADDRESS: Final = _server.SERVER_ADDRESS
SERVER_PORT: Final = _server.SERVER_PORT
ERROR_TYPE: Final = _error.ERROR_TYPE
SERVICE_NAME: Final = _service.SERVICE_NAME

RABBITMQ: Final = _messaging.MessagingSystemValues.RABBITMQ.value
OPERATION_SEND: Final = _messaging.MessagingOperationTypeValues.SEND.value
OPERATION_PROCESS: Final = _messaging.MessagingOperationTypeValues.PROCESS.value
# The broker's name for the nameless default exchange, used when a publish has neither an
# exchange nor a routing key to name its destination by.
DEFAULT_EXCHANGE: Final = "amq.default"

# Exception-event attributes, overridden with scrubbed text in record_failure.
_EXCEPTION_MESSAGE: Final = "exception.message"
_EXCEPTION_STACKTRACE: Final = "exception.stacktrace"

_TRUE_VALUES: Final = frozenset({"true", "1", "yes", "on"})

# W3C TraceContext + Baggage, whatever OTEL_PROPAGATORS says: the headers are a message contract.
_PROPAGATOR: Final = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
#: The headers trace propagation writes (``traceparent``, ``tracestate``, ``baggage``). Drop them
#: from headers copied off an old message that is published anew in another trace (a replay):
#: `inject_context` always overwrites ``traceparent`` but writes the other two only when the
#: current context has them, so stale ones would ride along.
PROPAGATION_HEADERS: Final = frozenset(_PROPAGATOR.fields)

_HeadersT = TypeVar("_HeadersT", bound=MutableMapping[str, Any])


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
# AMQP header carriers
# --------------------------------------------------------------------------------------------


class _HeadersSetter(Setter[MutableMapping[str, Any]]):
    """Writes propagation fields as ``str``: AMQP tables take them, and every client reads them."""

    def set(self, carrier: MutableMapping[str, Any], key: str, value: str) -> None:
        carrier[key] = value


class _HeadersGetter(Getter[Mapping[str, object]]):
    """Reads propagation fields from aio-pika headers, which hold ``bytes`` or ``str``.

    Long strings arrive as ``bytes`` depending on the client that published; anything that is
    neither is treated as absent rather than guessed at.
    """

    def get(self, carrier: Mapping[str, object], key: str) -> list[str] | None:
        value = carrier.get(key)
        if isinstance(value, str):
            return [value]
        if isinstance(value, bytes | bytearray):
            # Invalid UTF-8 becomes U+FFFD, which no propagator accepts: the field is ignored.
            return [bytes(value).decode("utf-8", errors="replace")]
        return None

    def keys(self, carrier: Mapping[str, object]) -> list[str]:
        return list(carrier.keys())


_SETTER: Final = _HeadersSetter()
_GETTER: Final = _HeadersGetter()


def inject_context(headers: _HeadersT, context: Context | None = None) -> _HeadersT:
    """Write ``traceparent``/``tracestate`` (and ``baggage``) for *context* into AMQP headers.

    With no *context* the current one is used, so call it inside `publish_span` to make the
    consumer's span a child of the publish. Returns *headers* (modified in place) for chaining.
    Generic over the mapping type so aio-pika's ``dict[str, FieldValue]`` is accepted as is.
    """
    carrier: MutableMapping[str, Any] = headers
    inject(carrier, context=context, setter=_SETTER)
    return headers


def extract_context(headers: Mapping[str, object] | None) -> Context:
    """Read the producer's trace context from AMQP headers; never raises.

    The result starts from an empty context, not the current one: a message's parent is whoever
    published it, not whatever happened to be active in the consumer loop. Missing or malformed
    headers give an empty context — the message is processed in a new trace — because a bad
    header from some other publisher must never cost us the message.
    """
    if not headers:
        return Context()
    try:
        return extract(headers, context=Context(), getter=_GETTER)
    except Exception:  # a propagator choking on hostile input must not take the consumer down
        _log.debug("trace_context_unreadable", exc_info=True)
        return Context()


def link_from_headers(
    headers: Mapping[str, object] | None,
    attributes: Mapping[str, AttributeValue] | None = None,
) -> Link | None:
    """A span `Link` to the trace context in message headers, or None when there is none.

    For work that relates to a message without continuing its trace: a replay runs in the
    operator's trace and links to the dead letter's. Never raises, like `extract_context`.
    """
    span_context = trace.get_current_span(extract_context(headers)).get_span_context()
    if not span_context.is_valid:
        return None
    return Link(span_context, attributes=dict(attributes) if attributes else None)


# --------------------------------------------------------------------------------------------
# Messaging spans
# --------------------------------------------------------------------------------------------


def _publish_destination(exchange: str, routing_key: str) -> str:
    """``messaging.destination.name`` of a publish, per the RabbitMQ conventions.

    ``{exchange}:{routing key}``; just the one that is not empty when the other is (with the
    default exchange the routing key is a queue name); ``amq.default`` when both are empty.
    """
    if exchange and routing_key:
        return f"{exchange}:{routing_key}"
    return exchange or routing_key or DEFAULT_EXCHANGE


def _process_destination(queue: str, exchange: str | None, routing_key: str | None) -> str:
    """``messaging.destination.name`` of a delivery, per the RabbitMQ conventions.

    ``{exchange}:{routing key}:{queue}`` with empty parts left out, and the routing key left out
    when it is the queue's own name (the default exchange routes by queue name).
    """
    key = routing_key if routing_key != queue else None
    return ":".join(part for part in (exchange, key, queue) if part)


def _span_target(exchange: str, routing_key: str) -> str:
    """The ``{destination}`` in a publish span's name: the exchange, which is low-cardinality.

    Routing keys can carry ids, so they stay out of span names; for the default exchange the
    routing key is a queue name and is used instead, then ``amq.default``.
    """
    return exchange or routing_key or DEFAULT_EXCHANGE


def _base_attributes(
    *,
    operation_type: str,
    operation_name: str,
    destination: str,
    routing_key: str | None,
    message_id: str | None,
    conversation_id: str | None,
    body_size: int | None,
    server_address: str | None,
    server_port: int | None,
) -> dict[str, AttributeValue]:
    attributes: dict[str, AttributeValue] = {
        MESSAGING_SYSTEM: RABBITMQ,
        MESSAGING_OPERATION_TYPE: operation_type,
        MESSAGING_OPERATION_NAME: operation_name,
        MESSAGING_DESTINATION_NAME: destination,
    }
    optional: dict[str, AttributeValue | None] = {
        # Conditionally required only when not empty.
        MESSAGING_ROUTING_KEY: routing_key or None,
        MESSAGING_MESSAGE_ID: message_id,
        MESSAGING_CONVERSATION_ID: conversation_id,
        MESSAGING_BODY_SIZE: body_size,
        SERVER_ADDRESS: server_address,
        SERVER_PORT: server_port,
    }
    attributes.update({key: value for key, value in optional.items() if value is not None})
    return attributes


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


@contextmanager
def publish_span(
    tracer: Tracer,
    *,
    exchange: str,
    routing_key: str,
    message_id: str | None,
    body_size: int | None = None,
    conversation_id: str | None = None,
    server_address: str | None = None,
    server_port: int | None = None,
    operation_name: str = "publish",
) -> Iterator[Span]:
    """A PRODUCER span around one publish, named ``"publish <exchange>"``.

    ``messaging.destination.name`` is ``<exchange>:<routing key>`` as the RabbitMQ conventions
    ask; the span name keeps to the exchange so routing keys never multiply span names.

    Call `inject_context` inside the block so the consumer continues this trace. An exception
    leaving the block marks the span failed (`record_failure`) and propagates.
    *operation_name* is the system-specific verb in the span name and
    ``messaging.operation.name`` (``"send"`` reads better for dead-lettering, say); the operation
    type is always ``send``.
    """
    attributes = _base_attributes(
        operation_type=OPERATION_SEND,
        operation_name=operation_name,
        destination=_publish_destination(exchange, routing_key),
        routing_key=routing_key,
        message_id=message_id,
        conversation_id=conversation_id,
        body_size=body_size,
        server_address=server_address,
        server_port=server_port,
    )
    with operation_span(
        tracer,
        f"{operation_name} {_span_target(exchange, routing_key)}",
        kind=SpanKind.PRODUCER,
        attributes=attributes,
    ) as span:
        yield span


@contextmanager
def process_span(
    tracer: Tracer,
    *,
    queue: str,
    headers: Mapping[str, object] | None,
    message_id: str | None,
    routing_key: str | None,
    exchange: str | None,
    body_size: int | None,
    links: Sequence[Link] = (),
    conversation_id: str | None = None,
    server_address: str | None = None,
    server_port: int | None = None,
) -> Iterator[Span]:
    """A CONSUMER span around handling one delivery, named ``"process <queue>"``.

    Its parent is the context the publisher put in *headers*, so producer and consumer share one
    trace; with no usable context it starts a new trace instead of nesting under whatever the
    consumer loop had active. The extracted context (baggage included) is current inside the
    block, so a retry or dead-letter publish from there continues the same trace. *links* relate
    the span to other traces (for example the original message of a replay). *exchange* and
    *routing_key* are the delivery's, as the broker reports them.
    """
    attributes = _base_attributes(
        operation_type=OPERATION_PROCESS,
        operation_name="process",
        destination=_process_destination(queue, exchange, routing_key),
        routing_key=routing_key,
        message_id=message_id,
        conversation_id=conversation_id,
        body_size=body_size,
        server_address=server_address,
        server_port=server_port,
    )
    token = otel_context.attach(extract_context(headers))
    try:
        with operation_span(
            tracer,
            f"process {queue}",
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=links,
        ) as span:
            yield span
    finally:
        otel_context.detach(token)
