"""The failure switch: "answer the next N deliveries with this error", then behave again.

Courier's retry and dead-letter paths are only proven when the outside world really says no,
so each sink holds one switch. It is armed with a count and a failure, each delivery that the
failure applies to uses up one, and at zero the sink accepts again. Arming replaces whatever
was armed before: a test states the whole outage it wants, it never adds to a leftover one.

The request bodies of ``POST /_sink/fail`` are validated here, strictly (unknown fields are an
error), because a typo in a fault-injection test otherwise shows up as a test that passes
without injecting anything.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from http import HTTPStatus
from typing import Any, Generic, TypeVar

__all__ = [
    "FailureSwitch",
    "HttpFailure",
    "SmtpFailure",
    "parse_http_failure",
    "parse_smtp_failure",
]

# Longest artificial latency accepted: long enough for any client timeout worth testing,
# short enough that a forgotten switch cannot hang a test run for good.
MAX_DELAY_MS = 600_000

_SMTP_DEFAULT_TEXT = {
    4: "4.3.0 Temporary failure, try again later (courier-smtp-sink)",
    5: "5.0.0 Permanent failure (courier-smtp-sink)",
}


@dataclass(frozen=True)
class SmtpFailure:
    """An SMTP reply the sink gives at the end of DATA instead of accepting the message.

    DATA is where a real server refuses a whole message after it has read it (content
    filters, queue full), and it is the one reply that covers every recipient at once.
    """

    code: int
    message: str

    def reply(self) -> str:
        return f"{self.code} {self.message}"


@dataclass(frozen=True)
class HttpFailure:
    """What the HTTP sink does to a provider request the switch applies to.

    ``status`` None means "answer normally, only late": that is how a timeout test gets a
    slow provider without an error. ``path`` None means every provider path.
    """

    status: int | None = 503
    path: str | None = None
    retry_after: int | None = None
    delay_ms: int = 0
    message: str | None = None

    def applies_to(self, path: str) -> bool:
        return self.path is None or self.path == path


F = TypeVar("F", SmtpFailure, HttpFailure)


class FailureSwitch(Generic[F]):
    """A failure and how many more deliveries get it; thread-safe (server vs. test thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failure: F | None = None
        self._remaining = 0
        self._used = 0

    def arm(self, count: int, failure: F) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        with self._lock:
            self._failure, self._remaining, self._used = failure, count, 0

    def clear(self) -> None:
        with self._lock:
            self._failure, self._remaining, self._used = None, 0, 0

    def take(self, applies: Callable[[F], bool] | None = None) -> F | None:
        """Use up one failure if one is armed (and *applies* to this delivery); else None."""
        with self._lock:
            failure = self._failure
            if failure is None or (applies is not None and not applies(failure)):
                return None
            self._remaining -= 1
            self._used += 1
            if self._remaining == 0:
                self._failure = None
            return failure

    def state(self) -> dict[str, Any]:
        """``{"armed", "remaining", "used", ...the failure's fields}`` for ``GET /_sink/fail``."""
        with self._lock:
            state: dict[str, Any] = {
                "armed": self._failure is not None,
                "remaining": self._remaining,
                "used": self._used,
            }
            if self._failure is not None:
                state.update(asdict(self._failure))
            return state


# --------------------------------------------------------------------------------------------
# Validation of POST /_sink/fail bodies
# --------------------------------------------------------------------------------------------


def _check_fields(body: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")


def _int_field(body: Mapping[str, Any], name: str, *, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}")
    return value


def _text_field(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string")
    if "\r" in value or "\n" in value:
        raise ValueError(f"{name} must be a single line")
    return value.strip()


def _count(body: Mapping[str, Any]) -> int:
    count = _int_field(body, "count", low=1, high=1_000_000)
    return 1 if count is None else count


def parse_smtp_failure(body: Mapping[str, Any]) -> tuple[int, SmtpFailure]:
    """``{"count": 2, "code": 451, "message": "4.3.0 try again later"}`` → (2, failure).

    ``code`` is required (4xx transient, 5xx permanent: that difference is what is under
    test); ``count`` defaults to 1; ``message`` to a text with an enhanced status code.
    """
    _check_fields(body, {"count", "code", "message"})
    code = _int_field(body, "code", low=400, high=599)
    if code is None:
        raise ValueError("code is required (an SMTP reply code from 400 to 599)")
    message = _text_field(body, "message") or _SMTP_DEFAULT_TEXT[code // 100]
    return _count(body), SmtpFailure(code=code, message=message)


def parse_http_failure(body: Mapping[str, Any]) -> tuple[int, HttpFailure]:
    """``{"count": 2, "status": 503, "path": "/sms", "retry_after": 1, "delay_ms": 0}``.

    Every field but ``count`` (default 1) is optional; ``status`` defaults to 503, and an
    explicit ``null`` means "no error, only the delay".
    """
    _check_fields(body, {"count", "status", "path", "retry_after", "delay_ms", "message"})
    status: int | None = HTTPStatus.SERVICE_UNAVAILABLE.value
    if "status" in body:
        status = _int_field(body, "status", low=400, high=599)
    path = _text_field(body, "path")
    if path is not None and not path.startswith("/"):
        path = "/" + path
    retry_after = _int_field(body, "retry_after", low=0, high=86_400)
    delay_ms = _int_field(body, "delay_ms", low=0, high=MAX_DELAY_MS) or 0
    if status is None and delay_ms == 0:
        raise ValueError("status null (answer normally) only makes sense with a delay_ms")
    failure = HttpFailure(
        status=status,
        path=path,
        retry_after=retry_after,
        delay_ms=delay_ms,
        message=_text_field(body, "message"),
    )
    return _count(body), failure
