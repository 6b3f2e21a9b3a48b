"""What a handler raises to ask for a retry or a dead letter, and how retries are spaced.

Handlers never ack. They return (done), raise :class:`RetryableError` (try again later) or
:class:`PermanentError` (it will never work: dead-letter it now). Anything else they raise is
treated as retryable, because an unexpected error is more often a passing fault than a bad
message, and the retry budget still bounds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta


class RetryableError(Exception):
    """A transient failure: timeout, connection refused, HTTP 5xx or 429, SMTP 4xx.

    ``retry_after`` (seconds) is a lower bound on the next attempt's delay, e.g. from an HTTP
    ``Retry-After`` header; the runner picks the first retry tier at least that long.
    """

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class PermanentError(Exception):
    """A failure that no retry will fix: bad payload, HTTP 4xx, SMTP 5xx."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def format_delay(delay: timedelta) -> str:
    """A short, stable name for a delay, used in retry queue names: 500ms, 5s, 2m, 1h."""
    ms = round(delay.total_seconds() * 1000)
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0 and ms >= size:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many times a message is tried and how long it waits between tries.

    Attempt 1 is the first delivery. After a retryable failure of attempt ``n`` (when
    ``n < max_attempts``) the message waits in tier ``min(n, len(delays)) - 1``: each tier is
    a queue whose TTL dead-letters back to the work queue, so the wait costs no worker time
    and survives restarts. Attempt ``max_attempts`` failing dead-letters the message.
    """

    delays: tuple[timedelta, ...] = (
        timedelta(seconds=5),
        timedelta(seconds=30),
        timedelta(minutes=5),
    )
    max_attempts: int = 5

    def __post_init__(self) -> None:
        if not self.delays:
            raise ValueError("a retry policy needs at least one delay")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if any(d <= timedelta(0) for d in self.delays):
            raise ValueError("retry delays must be positive")
        if list(self.delays) != sorted(set(self.delays)):
            raise ValueError("retry delays must be strictly increasing")

    def next_delay(self, attempt: int, *, retry_after: float | None = None) -> timedelta | None:
        """The delay after failed attempt ``attempt``, or None when the budget is spent."""
        if attempt >= self.max_attempts:
            return None
        index = min(max(attempt, 1), len(self.delays)) - 1
        if retry_after is not None:
            wanted = timedelta(seconds=retry_after)
            while index < len(self.delays) - 1 and self.delays[index] < wanted:
                index += 1
        return self.delays[index]
