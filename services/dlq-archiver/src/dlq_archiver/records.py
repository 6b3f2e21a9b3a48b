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

from aio_pika.abc import AbstractIncomingMessage
from pydantic import BaseModel, Field

from courier_common.logging import scrub_text
from courier_common.messaging import headers

REASON = headers.FAILURE_REASON
KIND = headers.FAILURE_KIND
EXCEPTION = headers.EXCEPTION
ORIGINAL_EXCHANGE = headers.ORIGINAL_EXCHANGE
ORIGINAL_ROUTING_KEY = headers.ORIGINAL_ROUTING_KEY
ORIGINAL_QUEUE = headers.ORIGINAL_QUEUE
FIRST_FAILED_AT = headers.FIRST_FAILED_AT
ATTEMPT = headers.ATTEMPT
REPLAY_OF = headers.REPLAY_OF
REPLAY_ID = headers.REPLAY_ID

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


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    text = _text(value)
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


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


def from_message(
    message: AbstractIncomingMessage, *, record_id: str, now: datetime
) -> DeadLetterRecord:
    """Build the record for a delivery of ``courier.dead-letters``."""
    headers: dict[str, Any] = dict(message.headers or {})
    deaths = headers.get("x-death")
    first_death: dict[str, Any] = deaths[0] if isinstance(deaths, list) and deaths else {}
    body = bytes(message.body)
    body_event_type, user_id = _event_fields(body)
    event_type = _text(message.type) if message.type not in (None, "None") else body_event_type
    event_type = body_event_type or event_type

    reason = _text(headers.get(REASON))
    if reason is None:  # dead-lettered by the broker itself (delivery limit, rejection, ttl)
        broker_reason = _text(first_death.get("reason")) or "unknown"
        count = first_death.get("count")
        reason = f"dead-lettered by the broker: {broker_reason}"
        if count is not None:
            reason += f" (count {count})"
        kind = "broker-" + broker_reason
    else:
        kind = _text(headers.get(KIND)) or "unknown"
    source_queue = (
        _text(headers.get(ORIGINAL_QUEUE)) or _text(first_death.get("queue")) or "unknown"
    )
    exception = _text(headers.get(EXCEPTION))
    attempts_raw = headers.get(ATTEMPT)
    try:
        attempts = int(_text(attempts_raw) or 0) if attempts_raw is not None else 0
    except ValueError:
        attempts = 0
    if not attempts and first_death:
        attempts = int(first_death.get("count") or 1)
    exchange = _text(headers.get(ORIGINAL_EXCHANGE))
    routing_key = _text(headers.get(ORIGINAL_ROUTING_KEY))
    if exchange is None and first_death:
        exchange = _text(first_death.get("exchange"))
        keys = first_death.get("routing-keys")
        routing_key = _text(keys[0]) if isinstance(keys, list) and keys else routing_key
    properties = {
        "content_type": message.content_type,
        "content_encoding": message.content_encoding,
        "delivery_mode": int(message.delivery_mode) if message.delivery_mode else None,
        "message_id": message.message_id,
        "correlation_id": message.correlation_id,
        "type": _text(message.type),
        "app_id": message.app_id,
        "timestamp": jsonable(message.timestamp) if message.timestamp else None,
    }
    return DeadLetterRecord(
        id=record_id,
        message_id=message.message_id,
        archived_at=now,
        source_queue=source_queue,
        event_type=event_type,
        original_exchange=exchange,
        original_routing_key=routing_key,
        reason=reason,
        reason_class=kind,
        exception=exception,
        attempts=attempts,
        first_failed_at=_parse_time(headers.get(FIRST_FAILED_AT))
        or _parse_time(first_death.get("time")),
        last_failed_at=now,
        trace_id=_trace_id(headers),
        fingerprint=fingerprint(source_queue, event_type, exception, reason),
        body_b64=base64.b64encode(body).decode(),
        body_size=len(body),
        content_type=message.content_type,
        properties=properties,
        headers=jsonable(headers),
        user_id=user_id,
        replay_of=_text(headers.get(REPLAY_OF)),
        replay_id=_text(headers.get(REPLAY_ID)),
    )
