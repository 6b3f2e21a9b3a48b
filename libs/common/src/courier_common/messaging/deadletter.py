"""The dead-letter contract: why a message died, as headers, and what a retry or replay carries.

Pure functions and values, no broker. Three kinds of message go through them:

* a **dead letter** gets a :class:`Diagnosis` (:meth:`Diagnosis.to_headers`), written by the
  runner when it dead-letters; :meth:`Diagnosis.read` reads it back from *any* dead letter —
  one of ours, or one the broker dead-lettered by itself with nothing but ``x-death``
  (a worker that died past the delivery limit, a rejection, a TTL, a length limit);
* a **retry hop** (:func:`retry_headers`) carries the attempt count and where the message was
  first published;
* a **replay** (:func:`replay_headers`) drops the diagnosis and the attempt count (a fresh
  budget) and says which record and which replay it is.

The header names are in :mod:`courier_common.messaging.headers`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from courier_common.messaging import headers as names
from courier_common.tracing import PROPAGATION_HEADERS

#: Longest reason a dead letter carries; longer ones are cut (a provider can answer a novel).
MAX_REASON_CHARS: Final = 2000
#: What ``x-courier-exception`` says when no exception caused the failure.
NO_EXCEPTION: Final = "none"


class FailureKind(enum.StrEnum):
    """Why a message was dead-lettered: the ``x-courier-failure-kind`` header.

    Courier's own kinds are decided by the runner; the ``broker-*`` kinds are read from
    ``x-death`` when the broker dead-lettered the message itself. The values are the archive's
    ``reason_class`` and a metric label, so the set is closed: anything else reads as
    :attr:`UNKNOWN`.
    """

    UNDECODABLE = "undecodable"
    NO_HANDLER = "no-handler"
    PERMANENT = "permanent"
    RETRIES_EXHAUSTED = "retries-exhausted"
    CRASHED = "crashed"
    BROKER_REJECTED = "broker-rejected"
    BROKER_DELIVERY_LIMIT = "broker-delivery_limit"
    BROKER_EXPIRED = "broker-expired"
    BROKER_MAXLEN = "broker-maxlen"
    UNKNOWN = "unknown"

    @classmethod
    def parse(cls, value: str | None) -> FailureKind:
        if value is None:
            return cls.UNKNOWN
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN

    @classmethod
    def of_broker(cls, reason: str | None) -> FailureKind:
        """The kind for an ``x-death`` reason (``rejected``, ``delivery_limit``, …)."""
        return cls.parse(f"broker-{reason}") if reason else cls.UNKNOWN

    @property
    def by_broker(self) -> bool:
        return self.value.startswith("broker-")


@dataclass(frozen=True, slots=True)
class Death:
    """One entry of the broker's ``x-death`` history (most recent first in the header)."""

    queue: str | None
    reason: str | None
    count: int
    exchange: str | None
    routing_keys: tuple[str, ...]
    time: datetime | None


def deaths_of(headers: Mapping[str, Any]) -> tuple[Death, ...]:
    """The parsed ``x-death`` history; entries the broker would not write are skipped."""
    raw = headers.get("x-death")
    if not isinstance(raw, list | tuple):
        return ()
    deaths: list[Death] = []
    for entry in raw:
        if not isinstance(entry, Mapping):
            continue
        keys = entry.get("routing-keys")
        count = _int(entry.get("count"))
        deaths.append(
            Death(
                queue=_text(entry.get("queue")),
                reason=_text(entry.get("reason")),
                count=count if count is not None else 1,
                exchange=_text(entry.get("exchange")),
                routing_keys=tuple(key for key in (_text(k) for k in keys) if key is not None)
                if isinstance(keys, list | tuple)
                else (),
                time=parse_time(entry.get("time")),
            )
        )
    return tuple(deaths)


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """Everything an operator needs to know about one dead letter.

    ``source_queue`` is the queue whose consumer gave up on it, and where a replay sends it
    back; ``original_exchange`` and ``original_routing_key`` are where it was first published
    (``None``: not known). ``attempts`` counts deliveries that were tried.
    """

    kind: FailureKind
    reason: str
    source_queue: str | None
    original_exchange: str | None = None
    original_routing_key: str | None = None
    attempts: int = 1
    exception: str | None = None
    first_failed_at: datetime | None = None
    #: The broker's own history, when it has one; informative, never written back.
    deaths: tuple[Death, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if len(self.reason) > MAX_REASON_CHARS:
            object.__setattr__(self, "reason", self.reason[:MAX_REASON_CHARS])

    def to_headers(self) -> dict[str, Any]:
        """The ``x-courier-*`` headers that carry this diagnosis on the dead letter."""
        out: dict[str, Any] = {
            names.FAILURE_REASON: self.reason,
            names.FAILURE_KIND: self.kind.value,
            names.EXCEPTION: self.exception or NO_EXCEPTION,
            names.ATTEMPT: self.attempts,
        }
        if self.source_queue is not None:
            out[names.ORIGINAL_QUEUE] = self.source_queue
        if self.original_exchange is not None:
            out[names.ORIGINAL_EXCHANGE] = self.original_exchange
        if self.original_routing_key is not None:
            out[names.ORIGINAL_ROUTING_KEY] = self.original_routing_key
        if self.first_failed_at is not None:
            out[names.FIRST_FAILED_AT] = self.first_failed_at.isoformat()
        return out

    @classmethod
    def read(cls, headers: Mapping[str, Any]) -> Diagnosis:
        """The diagnosis of any dead letter, never raising on odd headers.

        Courier's headers win; what they do not say comes from the broker's most recent
        ``x-death`` entry, which is all a message the broker dead-lettered by itself has.
        """
        deaths = deaths_of(headers)
        last = deaths[0] if deaths else None
        written = _text(headers.get(names.FAILURE_REASON))
        if written is not None:
            kind = FailureKind.parse(_text(headers.get(names.FAILURE_KIND)))
            reason = written
        elif last is not None:
            kind = FailureKind.of_broker(last.reason)
            reason = f"dead-lettered by the broker: {last.reason or 'unknown'} (count {last.count})"
        else:
            kind = FailureKind.UNKNOWN
            reason = "no diagnosis: neither Courier's headers nor the broker's x-death"
        exchange = _text(headers.get(names.ORIGINAL_EXCHANGE))
        routing_key = _text(headers.get(names.ORIGINAL_ROUTING_KEY))
        if exchange is None and last is not None:
            exchange = last.exchange
            routing_key = last.routing_keys[0] if last.routing_keys else routing_key
        exception = _text(headers.get(names.EXCEPTION))
        attempts = _int(headers.get(names.ATTEMPT))
        if attempts is None:
            attempts = last.count if last is not None else 1
        return cls(
            kind=kind,
            reason=reason,
            source_queue=_text(headers.get(names.ORIGINAL_QUEUE)) or (last.queue if last else None),
            original_exchange=exchange,
            original_routing_key=routing_key,
            attempts=max(attempts, 1),
            exception=None if exception == NO_EXCEPTION else exception,
            first_failed_at=parse_time(headers.get(names.FIRST_FAILED_AT))
            or (last.time if last else None),
            deaths=deaths,
        )


def exception_name(exc: BaseException | None) -> str | None:
    """``module.QualName`` of an exception: what ``x-courier-exception`` says."""
    if exc is None:
        return None
    cls = type(exc)
    return f"{cls.__module__}.{cls.__qualname__}"


def attempt_of(headers: Mapping[str, Any]) -> int:
    """The attempt number in ``x-courier-attempt`` (1 when absent or unreadable)."""
    value = _int(headers.get(names.ATTEMPT))
    return 1 if value is None else max(value, 1)


def dead_letter_headers(headers: Mapping[str, Any], diagnosis: Diagnosis) -> dict[str, Any]:
    """A dead letter's headers: the message's own, with its diagnosis over them."""
    out = dict(headers)
    out.update(diagnosis.to_headers())
    return out


def retry_headers(
    headers: Mapping[str, Any],
    *,
    attempt: int,
    exchange: str,
    routing_key: str,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The headers of the hop to a retry tier after failed attempt ``attempt``.

    The next attempt is ``attempt + 1``; the first hop records where the message was
    published (``exchange``, ``routing_key``, as delivered) and when it first failed, later
    hops keep those. The broker's death history is dropped: the tier adds its own.
    """
    out = {k: v for k, v in headers.items() if k not in names.BROKER_DEATH}
    out[names.ATTEMPT] = attempt + 1
    out.setdefault(names.ORIGINAL_EXCHANGE, exchange)
    out.setdefault(names.ORIGINAL_ROUTING_KEY, routing_key)
    out.setdefault(names.FIRST_FAILED_AT, (now or datetime.now(UTC)).isoformat())
    return out


#: Headers a replay does not carry over: the failure's diagnosis (the original route is set
#: again from it), the attempt count (a replay gets a fresh budget), an earlier replay's ids,
#: the broker's death history and the trace context (the replay has its own).
DROPPED_ON_REPLAY: Final = (
    names.DIAGNOSIS
    | names.BROKER_DEATH
    | {names.ATTEMPT, names.REPLAY_OF, names.REPLAY_ID}
    | PROPAGATION_HEADERS
)


def replay_headers(
    headers: Mapping[str, Any],
    *,
    replay_of: str,
    replay_id: str,
    diagnosis: Diagnosis,
) -> dict[str, Any]:
    """The headers of a replay of a dead letter with ``headers`` and ``diagnosis``.

    The replay goes straight to ``diagnosis.source_queue``; it keeps the original exchange
    and routing key in ``x-courier-original-*``, so the handler sees the route it was first
    published on.
    """
    out = {k: v for k, v in headers.items() if k not in DROPPED_ON_REPLAY}
    if diagnosis.original_exchange is not None:
        out[names.ORIGINAL_EXCHANGE] = diagnosis.original_exchange
    if diagnosis.original_routing_key is not None:
        out[names.ORIGINAL_ROUTING_KEY] = diagnosis.original_routing_key
    out[names.REPLAY_OF] = replay_of
    out[names.REPLAY_ID] = replay_id
    return out


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = _text(value)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def parse_time(value: Any) -> datetime | None:
    """A header's time (an AMQP timestamp or ISO 8601 text) as an aware datetime, or None."""
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
