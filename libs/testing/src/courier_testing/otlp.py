"""An in-process OTLP/gRPC trace receiver: the collector's side, for tests that export spans.

Processes under test export to it with ``OTEL_EXPORTER_OTLP_ENDPOINT`` (see `otlp_env`); a test
reads back what arrived as `ReceivedSpan` values, with ids as lowercase hex as they appear in
``traceparent`` headers and log lines.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2


@dataclass(frozen=True)
class ReceivedLink:
    trace_id: str
    span_id: str
    attributes: dict[str, object]


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span. ``kind`` is ``SERVER``, ``CLIENT``, ``PRODUCER``, ``CONSUMER`` or
    ``INTERNAL``; ``status`` is ``UNSET``, ``OK`` or ``ERROR``; ``parent_span_id`` is None
    for a root span."""

    service: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str | None
    attributes: dict[str, object]
    links: tuple[ReceivedLink, ...]
    status: str

    def __str__(self) -> str:
        parent = self.parent_span_id or "root"
        return f"{self.service}: {self.kind} {self.name!r} {self.span_id} <- {parent}"


def _value(value: common_pb2.AnyValue) -> object:
    field = value.WhichOneof("value")
    if field is None:
        return None
    if field == "array_value":
        return [_value(item) for item in value.array_value.values]
    if field == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    result: object = getattr(value, field)
    return result


def _attributes(attributes: Any) -> dict[str, object]:
    return {attribute.key: _value(attribute.value) for attribute in attributes}


def _span(service: str, span: trace_pb2.Span) -> ReceivedSpan:
    kind = trace_pb2.Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_")
    status = trace_pb2.Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_")
    return ReceivedSpan(
        service=service,
        name=span.name,
        kind=kind,
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex() or None,
        attributes=_attributes(span.attributes),
        links=tuple(
            ReceivedLink(link.trace_id.hex(), link.span_id.hex(), _attributes(link.attributes))
            for link in span.links
        ),
        status=status,
    )


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span of every export request it is sent."""

    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()

    def Export(  # the gRPC method name, as the servicer defines it
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received: list[ReceivedSpan] = []
        for resource_spans in request.resource_spans:
            service = str(_attributes(resource_spans.resource.attributes).get("service.name"))
            for scope_spans in resource_spans.scope_spans:
                received.extend(_span(service, span) for span in scope_spans.spans)
        with self._lock:
            self._spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[ReceivedSpan]:
        """Everything received so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._spans)


@contextmanager
def otlp_receiver() -> Iterator[tuple[TraceReceiver, int]]:
    """A receiver listening on a free port of 127.0.0.1; yields it and the port."""
    receiver = TraceReceiver()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        receiver, server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield receiver, port
    finally:
        server.stop(grace=None)


def otlp_env(port: int, *, schedule_delay_ms: int = 100) -> dict[str, str]:
    """Environment for a process that should export its spans to the receiver on *port*.

    Proxies are bypassed for the loopback address (gRPC honours ``*_proxy`` variables), and the
    batch processor exports every *schedule_delay_ms* instead of every 5 s.
    """
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": str(schedule_delay_ms),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "no_grpc_proxy": "127.0.0.1,localhost",
    }


def children_of(spans: list[ReceivedSpan], parent: ReceivedSpan) -> list[ReceivedSpan]:
    """The spans of *spans* whose parent is *parent* (same trace, same span id)."""
    return [
        span
        for span in spans
        if span.trace_id == parent.trace_id and span.parent_span_id == parent.span_id
    ]


def disconnected(spans: list[ReceivedSpan], trace_id: str) -> list[str]:
    """What keeps *trace_id* from being one connected tree: every root past the first and every
    span whose parent is not in the trace, described; empty when the trace is connected."""
    in_trace = [span for span in spans if span.trace_id == trace_id]
    ids = {span.span_id for span in in_trace}
    roots = [span for span in in_trace if span.parent_span_id is None]
    problems = [f"more than one root: {root}" for root in roots[1:]]
    problems += [
        f"parent not in the trace: {span}"
        for span in in_trace
        if span.parent_span_id is not None and span.parent_span_id not in ids
    ]
    if not roots:
        problems.append("no root span")
    return problems
