"""One delivery as Courier hands it to a handler: bytes, headers, properties, history.

No AMQP library type crosses this line: :class:`Delivery` is built by the delivery loop from
whatever the client library received, and is all a handler — typed or raw — gets to see.
Inside a handler, :func:`current_delivery` returns it.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from courier_common.messaging import headers as names
from courier_common.messaging.deadletter import (
    Death,
    Diagnosis,
    FailureKind,
    attempt_of,
    deaths_of,
    parse_time,
)


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message as the broker delivered it from ``queue``.

    ``exchange`` and ``routing_key`` are the ones it was delivered with (after a retry hop or a
    replay: the default exchange and the queue's name); ``original_exchange`` and
    ``original_routing_key`` are where it was first published.
    """

    queue: str
    body: bytes
    headers: Mapping[str, Any]
    exchange: str
    routing_key: str
    redelivered: bool = False
    message_id: str | None = None
    content_type: str | None = None
    content_encoding: str | None = None
    type: str | None = None
    timestamp: datetime | None = None
    correlation_id: str | None = None
    app_id: str | None = None
    delivery_mode: int | None = None
    #: ``x-courier-attempt``: 1 on the first delivery, one more after each retry hop.
    attempt: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attempt", attempt_of(self.headers))

    @property
    def deaths(self) -> tuple[Death, ...]:
        """The broker's ``x-death`` history of this message, most recent first."""
        return deaths_of(self.headers) if "x-death" in self.headers else ()

    @property
    def original_exchange(self) -> str:
        return _header_text(self.headers, names.ORIGINAL_EXCHANGE) or self.exchange

    @property
    def original_routing_key(self) -> str:
        return _header_text(self.headers, names.ORIGINAL_ROUTING_KEY) or self.routing_key


def diagnose(
    delivery: Delivery,
    kind: FailureKind,
    reason: str,
    *,
    exception: str | None = None,
    now: datetime | None = None,
) -> Diagnosis:
    """The diagnosis of ``delivery`` failing in its queue's consumer: the one place it is built.

    The first failure time is carried from the first retry hop, or is now.
    """
    first = parse_time(delivery.headers.get(names.FIRST_FAILED_AT))
    return Diagnosis(
        kind=kind,
        reason=reason,
        source_queue=delivery.queue,
        original_exchange=delivery.original_exchange,
        original_routing_key=delivery.original_routing_key,
        attempts=delivery.attempt,
        exception=exception,
        first_failed_at=first or now or datetime.now(UTC),
    )


def _header_text(headers: Mapping[str, Any], name: str) -> str | None:
    value = headers.get(name)
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode(errors="replace")
    return None if value is None else str(value)


_current: contextvars.ContextVar[Delivery | None] = contextvars.ContextVar(
    "courier_delivery", default=None
)


def current_delivery() -> Delivery:
    """The delivery being handled; only valid inside a handler."""
    delivery = _current.get()
    if delivery is None:
        raise RuntimeError("current_delivery() called outside a message handler")
    return delivery


def set_current(delivery: Delivery | None) -> contextvars.Token[Delivery | None]:
    """Make ``delivery`` current for this task (the delivery loop does, around each one)."""
    return _current.set(delivery)
