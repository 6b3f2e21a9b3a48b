"""A dead letter as the archive keeps it: raw payload, properties, headers and its diagnosis.

Everything is taken from the message itself, never trusted to be well-formed: the body may be
any bytes, the headers may hold bytes, tables, lists or timestamps. The record is JSON-safe.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, Field

from courier_common.messaging import Delivery, Diagnosis, FailureKind, headers
from courier_common.pii import scrub_text

#: ``source_queue`` of a dead letter that says nowhere which queue it died in.
UNKNOWN_QUEUE = "unknown"

_NORMALIZERS = (
    (
        re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"),
        "<uuid>",
    ),
    (re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+"), "<email>"),
    (re.compile(r"\b[0-9a-fA-F]{16,}\b"), "<hex>"),
    (re.compile(r"\d+(\.\d+)?"), "<n>"),
    (re.compile(r"\s+"), " "),
)


class ReplayEntry(BaseModel):
    replay_id: str
    at: datetime
    job_id: str | None = None


class DeadLetterRecord(BaseModel):
    """One archived dead letter."""

    id: str
    message_id: str | None
    archived_at: datetime
    source_queue: str
    event_type: str | None
    original_exchange: str | None
    original_routing_key: str | None
    reason: str
    reason_class: str
    exception: str | None
    attempts: int
    first_failed_at: datetime | None
    last_failed_at: datetime
    trace_id: str | None
    fingerprint: str
    body_b64: str
    body_size: int
    content_type: str | None
    properties: dict[str, Any]
    headers: dict[str, Any]
    user_id: str | None = None
    replay_of: str | None = None
    replay_id: str | None = None
    status: str = "dead"
    replays: list[ReplayEntry] = Field(default_factory=list)
    erased: bool = False

    def diagnosis(self) -> Diagnosis:
        """The record's diagnosis, as the dead letter carried it (see ``from_delivery``)."""
        return Diagnosis(
            kind=FailureKind.parse(self.reason_class),
            reason=self.reason,
            source_queue=None if self.source_queue == UNKNOWN_QUEUE else self.source_queue,
            original_exchange=self.original_exchange,
            original_routing_key=self.original_routing_key,
            attempts=max(self.attempts, 1),
            exception=self.exception,
            first_failed_at=self.first_failed_at,
        )

    def log_fields(self) -> dict[str, str | None]:
        """What a log line says of this record: which one, from where, and why."""
        return {
            "record_id": self.id,
            "message_id": self.message_id,
            "source_queue": self.source_queue,
            "event_type": self.event_type,
            "reason_class": self.reason_class,
            "reason": self.reason,
        }

    def amqp_headers(self) -> dict[str, Any]:
        """The headers as AMQP values again: bytes that were kept as base64 come back."""
        return {name: amqp_value(value) for name, value in self.headers.items()}

    @property
    def body(self) -> bytes:
        return base64.b64decode(self.body_b64)

    def body_text(self) -> str | None:
        try:
            return self.body.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def view(self, *, reveal: bool = False, full: bool = True) -> dict[str, Any]:
        """What the API shows: masked unless ``reveal``; the summary omits payload and headers."""
        data = self.model_dump(mode="json", exclude={"body_b64"})
        text = self.body_text()
        if full:
            data["body"] = text
            data["body_b64"] = None if text is not None else self.body_b64
        else:
            for name in ("properties", "headers", "replays"):
                data.pop(name)
        if reveal:
            return data
        return dict(mask(data))


def mask(value: Any) -> Any:
    """Emails and phone numbers masked in every string of a JSON-like value."""
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        return {k: mask(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v) for v in value]
    return value


def jsonable(value: Any) -> Any:
    """AMQP field values (bytes, Decimal, datetime, tables, arrays) as JSON values."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def amqp_value(value: Any) -> Any:
    """The inverse of :func:`jsonable` where it can be: ``{"base64": …}`` becomes bytes again."""
    if isinstance(value, dict):
        if set(value) == {"base64"} and isinstance(value["base64"], str):
            try:
                return bytearray(base64.b64decode(value["base64"], validate=True))
            except ValueError:
                return value
        return {k: amqp_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [amqp_value(v) for v in value]
    return value


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def normalize_reason(reason: str) -> str:
    """The reason with ids, addresses and numbers blanked, so alike failures group together."""
    for pattern, replacement in _NORMALIZERS:
        reason = pattern.sub(replacement, reason)
    return reason.strip()[:300]


def fingerprint(queue: str, event_type: str | None, exception: str | None, reason: str) -> str:
    key = "|".join((queue, event_type or "-", exception or "-", normalize_reason(reason)))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _event_fields(body: bytes) -> tuple[str | None, str | None]:
    """(event type, user id) from the body when it is a JSON envelope; never raises."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(document, dict):
        return None, None
    event_type = document.get("type") if isinstance(document.get("type"), str) else None
    data = document.get("data")
    user_id = data.get("user_id") if isinstance(data, dict) else None
    return event_type, user_id if isinstance(user_id, str) else None


def _trace_id(headers: dict[str, Any]) -> str | None:
    parts = (_text(headers.get("traceparent")) or "").split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


def from_delivery(delivery: Delivery, *, record_id: str, now: datetime) -> DeadLetterRecord:
    """Build the record for a delivery of ``courier.dead-letters``.

    The diagnosis is read with courier_common's dead-letter contract, so a dead letter of
    Courier's and one the broker dead-lettered by itself (only ``x-death``) read alike.
    """
    message_headers = dict(delivery.headers)
    diagnosis = Diagnosis.read(message_headers)
    body = bytes(delivery.body)
    body_event_type, user_id = _event_fields(body)
    event_type = body_event_type or (delivery.type if delivery.type not in (None, "None") else None)
    source_queue = diagnosis.source_queue or UNKNOWN_QUEUE
    properties = {
        "content_type": delivery.content_type,
        "content_encoding": delivery.content_encoding,
        "delivery_mode": delivery.delivery_mode,
        "message_id": delivery.message_id,
        "correlation_id": delivery.correlation_id,
        "type": delivery.type,
        "app_id": delivery.app_id,
        "timestamp": jsonable(delivery.timestamp) if delivery.timestamp else None,
    }
    return DeadLetterRecord(
        id=record_id,
        message_id=delivery.message_id,
        archived_at=now,
        source_queue=source_queue,
        event_type=event_type,
        original_exchange=diagnosis.original_exchange,
        original_routing_key=diagnosis.original_routing_key,
        reason=diagnosis.reason,
        reason_class=diagnosis.kind.value,
        exception=diagnosis.exception,
        attempts=diagnosis.attempts,
        first_failed_at=diagnosis.first_failed_at,
        last_failed_at=now,
        trace_id=_trace_id(message_headers),
        fingerprint=fingerprint(source_queue, event_type, diagnosis.exception, diagnosis.reason),
        body_b64=base64.b64encode(body).decode(),
        body_size=len(body),
        content_type=delivery.content_type,
        properties=properties,
        headers=jsonable(message_headers),
        user_id=user_id,
        replay_of=_text(message_headers.get(headers.REPLAY_OF)),
        replay_id=_text(message_headers.get(headers.REPLAY_ID)),
    )
