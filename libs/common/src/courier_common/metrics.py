"""Metric definitions that more than one service uses.

Metrics are registered on a registry passed in (never the global default), so tests and
several runners in one process do not collide. Labels are bounded: queue and exchange names,
event types from the catalog (anything else becomes ``unknown``), outcomes from fixed sets.
Never a user id, an email or an event id.

A service exposes only the families of the parts it runs: publishing is always registered, the
consumer families when a `ConsumerRunner` uses the metrics, the backlog gauges when a
`BacklogMonitor` does. docs/metrics.md is the catalog, and a test holds every service to it.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.registry import Collector

#: Outcomes of one consumed message; the runner decides exactly one per delivery.
CONSUME_OUTCOMES = ("acked", "retried", "dead_lettered", "duplicate")
#: Outcomes of one publish.
PUBLISH_OUTCOMES = ("confirmed", "returned", "nacked", "failed")

HANDLER_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
AGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
UNKNOWN = "unknown"


def service_registry() -> CollectorRegistry:
    """The registry one service process exposes on ``/metrics``.

    It carries the standard ``process_*`` (CPU, memory, file descriptors, start time) and
    ``python_info`` families, which every Prometheus dashboard knows. The ``*_created`` samples
    the client adds to each counter and histogram are switched off: they double the series and
    no Courier query reads them.
    """
    disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus-client
    registry = CollectorRegistry(auto_describe=True)
    registry.register(PROCESS_COLLECTOR)
    registry.register(PLATFORM_COLLECTOR)
    return registry


class MessagingMetrics:
    """Publishing, consuming and backlog metrics, shared by every service.

    Only ``courier_messages_published_total`` is registered up front; see `use_consumer`,
    `use_idempotency` and `use_backlog`.
    """

    def __init__(self, registry: CollectorRegistry, event_types: Iterable[str] = ()) -> None:
        self._known_types = frozenset(event_types)
        self._registry = registry
        self._registered: set[int] = set()
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
            registry=None,
        )
        self.handler_duration = Histogram(
            "courier_handler_duration_seconds",
            "Time a handler took, successful or not.",
            ["queue", "event_type"],
            buckets=HANDLER_BUCKETS,
            registry=None,
        )
        self.event_age = Histogram(
            "courier_event_age_seconds",
            "Event age when a worker finished it: end-to-end lag from the event's time.",
            ["queue", "event_type"],
            buckets=AGE_BUCKETS,
            registry=None,
        )
        self.in_flight = Gauge(
            "courier_messages_in_flight",
            "Messages this worker holds unacked right now.",
            ["queue"],
            registry=None,
        )
        self.queue_messages = Gauge(
            "courier_queue_messages",
            "Messages in a queue as the broker reports them (ready or unacked).",
            ["queue", "state"],
            registry=None,
        )
        self.queue_consumers = Gauge(
            "courier_queue_consumers",
            "Consumers subscribed to a queue, as the broker reports them.",
            ["queue"],
            registry=None,
        )
        self.idempotency_claims = Counter(
            "courier_idempotency_claims",
            "Idempotency claims by result: claimed, done (skip), busy (another worker).",
            ["result"],
            registry=None,
        )
        self._consumer: tuple[Collector, ...] = (
            self.consumed,
            self.handler_duration,
            self.event_age,
            self.in_flight,
        )
        self._backlog: tuple[Collector, ...] = (self.queue_messages, self.queue_consumers)

    def _register(self, collectors: tuple[Collector, ...]) -> None:
        for collector in collectors:
            if id(collector) not in self._registered:
                self._registry.register(collector)
                self._registered.add(id(collector))

    def use_consumer(self) -> None:
        """Expose the consumer families (idempotent): a `ConsumerRunner` calls it."""
        self._register(self._consumer)

    def use_idempotency(self) -> None:
        """Expose the idempotency claim counter (idempotent): an `IdempotencyStore` calls it."""
        self._register((self.idempotency_claims,))

    def use_backlog(self) -> None:
        """Expose the queue backlog gauges (idempotent): a `BacklogMonitor` calls it."""
        self._register(self._backlog)

    def event_type_label(self, event_type: str | None) -> str:
        """Keep the event_type label bounded: only catalogued types get their own series."""
        if event_type and event_type in self._known_types:
            return event_type
        return UNKNOWN

    def add_event_types(self, event_types: Iterable[str]) -> None:
        self._known_types = self._known_types | frozenset(event_types)
