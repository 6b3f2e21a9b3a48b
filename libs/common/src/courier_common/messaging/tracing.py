"""Trace context across RabbitMQ: W3C headers on every message, and messaging spans.

One trace has to run from ``POST /v1/users`` through the outbox relay, the publish, every consume
and retry, to the dead-letter archive. HTTP gets that from instrumentation; AMQP does not, so this
module carries W3C trace context in message headers (`inject_context`, `extract_context`,
`link_from_headers`) and names messaging spans (`publish_span`, `process_span`) the way the OTel
messaging semantic conventions say, so any backend groups them correctly. The SDK set-up and
failure recording are `courier_common.tracing`'s.

Attribute names come from ``opentelemetry.semconv``. The messaging ones only exist in its
``_incubating`` package (the messaging conventions are not stable yet), so they are imported in
one place below and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any, Final, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagate import extract, inject
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.semconv._incubating.attributes import messaging_attributes as _messaging
from opentelemetry.trace import Link, Span, SpanKind, Tracer
from opentelemetry.util.types import AttributeValue

from courier_common.logging import get_logger
from courier_common.tracing import SERVER_ADDRESS, SERVER_PORT, operation_span

__all__ = [
    "extract_context",
    "inject_context",
    "link_from_headers",
    "process_span",
    "publish_span",
]

_log = get_logger(__name__)

# --- messaging semantic-convention names: the only place they are spelled --------------------
MESSAGING_SYSTEM: Final = _messaging.MESSAGING_SYSTEM
MESSAGING_OPERATION_TYPE: Final = _messaging.MESSAGING_OPERATION_TYPE
MESSAGING_OPERATION_NAME: Final = _messaging.MESSAGING_OPERATION_NAME
MESSAGING_DESTINATION_NAME: Final = _messaging.MESSAGING_DESTINATION_NAME
MESSAGING_ROUTING_KEY: Final = _messaging.MESSAGING_RABBITMQ_DESTINATION_ROUTING_KEY
MESSAGING_MESSAGE_ID: Final = _messaging.MESSAGING_MESSAGE_ID
MESSAGING_CONVERSATION_ID: Final = _messaging.MESSAGING_MESSAGE_CONVERSATION_ID
MESSAGING_BODY_SIZE: Final = _messaging.MESSAGING_MESSAGE_BODY_SIZE

RABBITMQ: Final = _messaging.MessagingSystemValues.RABBITMQ.value
OPERATION_SEND: Final = _messaging.MessagingOperationTypeValues.SEND.value
OPERATION_PROCESS: Final = _messaging.MessagingOperationTypeValues.PROCESS.value
# The broker's name for the nameless default exchange, used when a publish has neither an
# exchange nor a routing key to name its destination by.
_DEFAULT_EXCHANGE_NAME: Final = "amq.default"

_HeadersT = TypeVar("_HeadersT", bound=MutableMapping[str, Any])


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
    return exchange or routing_key or _DEFAULT_EXCHANGE_NAME


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
    return exchange or routing_key or _DEFAULT_EXCHANGE_NAME


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
