"""Metric definitions that more than one service uses.

Metrics are registered on a registry passed in (never the global default), so tests and
several runners in one process do not collide. Labels are bounded: queue and exchange names,
event types from the catalog (anything else becomes ``unknown``), outcomes from fixed sets.
Never a user id, an email or an event id.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Outcomes of one consumed message; the runner decides exactly one per delivery.
CONSUME_OUTCOMES = ("acked", "retried", "dead_lettered", "duplicate")
#: Outcomes of one publish.
PUBLISH_OUTCOMES = ("confirmed", "returned", "nacked", "failed")

HANDLER_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
AGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
UNKNOWN = "unknown"


class MessagingMetrics:
    """Publishing, consuming and backlog metrics, shared by every service."""

    def __init__(self, registry: CollectorRegistry, event_types: Iterable[str] = ()) -> None:
        self._known_types = frozenset(event_types)
        self.published = Counter(
            "courier_messages_published",
            "Messages published, by exchange and broker outcome.",
            ["exchange", "outcome"],
            registry=registry,
        )
        self.consumed = Counter(
            "courier_messages_consumed",
            "Messages consumed, by queue, event type and the runner's decision.",
            ["queue", "event_type", "outcome"],
            registry=registry,
        )
        self.handler_duration = Histogram(
            "courier_handler_duration_seconds",
            "Time a handler took, successful or not.",
            ["queue", "event_type"],
            buckets=HANDLER_BUCKETS,
            registry=registry,
        )
        self.event_age = Histogram(
            "courier_event_age_seconds",
            "Event age when a worker finished it: end-to-end lag from the event's time.",
            ["queue", "event_type"],
            buckets=AGE_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "courier_messages_in_flight",
            "Messages this worker holds unacked right now.",
            ["queue"],
            registry=registry,
        )
        self.queue_messages = Gauge(
            "courier_queue_messages",
            "Messages in a queue as the broker reports them (ready or unacked).",
            ["queue", "state"],
            registry=registry,
        )
        self.queue_consumers = Gauge(
            "courier_queue_consumers",
            "Consumers subscribed to a queue, as the broker reports them.",
            ["queue"],
            registry=registry,
        )
        self.idempotency_claims = Counter(
            "courier_idempotency_claims",
            "Idempotency claims by result: claimed, done (skip), busy (another worker).",
            ["result"],
            registry=registry,
        )

    def event_type_label(self, event_type: str | None) -> str:
        """Keep the event_type label bounded: only catalogued types get their own series."""
        if event_type and event_type in self._known_types:
            return event_type
        return UNKNOWN

    def add_event_types(self, event_types: Iterable[str]) -> None:
        self._known_types = self._known_types | frozenset(event_types)
