"""The typed event runner: decode, dispatch to a handler, decide the settlement.

:class:`ConsumerRunner` is a handler on the :class:`~courier_common.messaging.loop.DeliveryLoop`.
It decides, in :meth:`ConsumerRunner.handle`, what becomes of every delivery, and the loop
applies that decision in one place (:meth:`DeliveryLoop.settle`):

=================================================  =========================  ==============
the delivery / the handler…                        settlement                 outcome
=================================================  =========================  ==============
returned                                           ``Ack()``                  acked
skipped every effect (already done)                ``Ack(duplicate=True)``    duplicate
raised ``RetryableError`` (or anything unexpected)  ``Retry(delay)``          retried
  … on the last attempt                            ``DeadLetter``             dead_lettered
raised ``PermanentError``                          ``DeadLetter``             dead_lettered
does not decode, or has no handler                 ``DeadLetter``             dead_lettered
the runner itself crashed                          ``DeadLetter`` (crashed)   dead_lettered
=================================================  =========================  ==============

The retry delay is chosen by the work queue's :class:`RetryPolicy`; a dead letter's
:class:`Diagnosis` is built by :func:`diagnose`. A process that dies before deciding is caught
by the queue's ``x-delivery-limit``: the broker dead-letters it with ``x-death``.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from opentelemetry.trace import Tracer, get_current_span
from prometheus_client import Counter, Histogram

from courier_common.failpoints import failpoint
from courier_common.logging import get_logger
from courier_common.messaging.connection import AmqpConnection
from courier_common.messaging.deadletter import FailureKind, exception_name
from courier_common.messaging.delivery import Delivery, diagnose
from courier_common.messaging.envelope import EnvelopeError, Event, EventCatalog, EventData
from courier_common.messaging.idempotency import IdempotencyStore, track_skips
from courier_common.messaging.loop import DeliveryLoop
from courier_common.messaging.retry import PermanentError, RetryableError
from courier_common.messaging.settlement import (
    Ack,
    DeadLetter,
    Retry,
    Settlement,
)
from courier_common.messaging.topology import WorkQueue
from courier_common.metrics import MessagingMetrics
from courier_common.tracing import get_tracer, record_failure

log = get_logger(__name__)

D = TypeVar("D", bound=EventData)
Handler = Callable[[Event[Any]], Awaitable[None]]

#: The type of the event being handled, once decoded: the loop runs ``handle`` and ``settled``
#: of one delivery in that delivery's own task, so this is per delivery.
_event_type: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "courier_event_type", default=None
)


class Router:
    """Event type -> handler. Its catalog is what the runner accepts; anything else is dead."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self.catalog = EventCatalog()

    def add(self, model: type[D], handler: Callable[[Event[D]], Awaitable[None]]) -> None:
        if model.event_type in self._handlers:
            raise ValueError(f"a handler for {model.event_type!r} is already registered")
        self.catalog.register(model)
        self._handlers[model.event_type] = handler

    def handles(
        self, model: type[D]
    ) -> Callable[[Callable[[Event[D]], Awaitable[None]]], Callable[[Event[D]], Awaitable[None]]]:
        """Decorator form of :meth:`add`."""

        def register(
            handler: Callable[[Event[D]], Awaitable[None]],
        ) -> Callable[[Event[D]], Awaitable[None]]:
            self.add(model, handler)
            return handler

        return register

    def handler_for(self, event_type: str) -> Handler | None:
        return self._handlers.get(event_type)


class ConsumerRunner:
    """Consumes one work queue of typed events, up to ``prefetch`` handled concurrently."""

    def __init__(
        self,
        *,
        connection: AmqpConnection,
        queue: WorkQueue,
        router: Router,
        metrics: MessagingMetrics,
        consumer_name: str,
        prefetch: int = 32,
        idempotency: IdempotencyStore | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.queue = queue
        self.router = router
        self.metrics = metrics
        self.consumer_name = consumer_name
        self.idempotency = idempotency
        metrics.add_event_types(router.catalog.types)
        # Metric children resolved once per label set, not with .labels() per message.
        self._consumed: dict[tuple[str, str], Counter] = {}
        self._timings: dict[str, tuple[Histogram, Histogram]] = {}
        self.loop = DeliveryLoop(
            connection=connection,
            queue=queue,
            handler=self,
            prefetch=prefetch,
            metrics=metrics,
            tracer=tracer or get_tracer("courier_common.consumer"),
        )

    @property
    def in_flight(self) -> int:
        return self.loop.in_flight

    async def start(self) -> None:
        """Subscribe. The topology must have been declared (see :func:`declare_topology`)."""
        await self.loop.start()

    async def stop(self, timeout: float = 25.0) -> bool:
        """Stop taking messages and drain (see :meth:`DeliveryLoop.stop`)."""
        return await self.loop.stop(timeout)

    # --- DeliveryHandler ------------------------------------------------------------------

    async def handle(self, delivery: Delivery) -> Settlement:
        """Decode, run the handler once per event id, and decide."""
        span = get_current_span()
        _event_type.set(None)
        try:
            event = self.router.catalog.decode(delivery.body, content_type=delivery.content_type)
        except EnvelopeError as exc:
            record_failure(span, exc, error_type="undecodable")
            return self._dead(delivery, FailureKind.UNDECODABLE, exc.reason, exc)
        _event_type.set(event.type)
        handler = self.router.handler_for(event.type)
        if handler is None:  # catalog and handlers are registered together; defensive
            reason = f"no handler for event type '{event.type}'"
            return self._dead(delivery, FailureKind.NO_HANDLER, reason, None)
        duration, age = self._timings_for(event.type)
        tracker = track_skips()
        started = time.perf_counter()
        try:
            if self.idempotency is not None:
                key = self.idempotency.key(self.consumer_name, str(event.id))
                await self.idempotency.run_once(key, lambda: handler(event))
            else:
                await handler(event)
        except PermanentError as exc:
            record_failure(span, exc, error_type="permanent")
            return self._dead(delivery, FailureKind.PERMANENT, exc.reason, exc)
        except Exception as exc:
            record_failure(span, exc)
            return self._retry(delivery, exc)
        finally:
            duration.observe(time.perf_counter() - started)
        age.observe(max(0.0, (datetime.now(UTC) - event.time).total_seconds()))
        failpoint("consumer.before_ack")
        return Ack(duplicate=bool(tracker.skipped and not tracker.ran))

    def on_crash(self, delivery: Delivery, exc: Exception) -> Settlement:
        return self._dead(delivery, FailureKind.CRASHED, f"handling crashed: {exc!r}", exc)

    def settled(self, delivery: Delivery, settlement: Settlement, seconds: float) -> None:
        """One metric sample and one log line per delivery, whatever became of it."""
        event_type = _event_type.get()
        key = (event_type or "", settlement.outcome)
        counter = self._consumed.get(key)
        if counter is None:
            label = self.metrics.event_type_label(event_type)
            counter = self.metrics.consumed.labels(self.queue.name, label, settlement.outcome)
            self._consumed[key] = counter
        counter.inc()
        fields: dict[str, Any] = {"event_type": event_type, "duration_ms": round(seconds * 1000, 2)}
        match settlement:
            case DeadLetter(diagnosis=diagnosis):
                log.warning("message_dead_lettered", reason=diagnosis.reason, **fields)
            case Retry(delay=delay, reason=reason):
                log.info("message_retried", reason=f"{reason} (next attempt in {delay})", **fields)
            case Ack():
                log.info(f"message_{settlement.outcome}", **fields)
            case _:
                log.warning(f"message_{settlement.outcome}", reason=settlement.reason, **fields)

    # --- decisions ------------------------------------------------------------------------

    def _timings_for(self, event_type: str) -> tuple[Histogram, Histogram]:
        """(handler duration, event age) children for an event type."""
        found = self._timings.get(event_type)
        if found is None:
            label = self.metrics.event_type_label(event_type)
            found = (
                self.metrics.handler_duration.labels(self.queue.name, label),
                self.metrics.event_age.labels(self.queue.name, label),
            )
            self._timings[event_type] = found
        return found

    def _retry(self, delivery: Delivery, exc: Exception) -> Settlement:
        """The next retry tier, or a dead letter once the attempt budget is spent."""
        reason = exc.reason if isinstance(exc, RetryableError) else f"{exc!r}"
        retry_after = exc.retry_after if isinstance(exc, RetryableError) else None
        delay = self.queue.retry.next_delay(delivery.attempt, retry_after=retry_after)
        if delay is None:
            exhausted = f"gave up after {delivery.attempt} attempts; last error: {reason}"
            return self._dead(delivery, FailureKind.RETRIES_EXHAUSTED, exhausted, exc)
        return Retry(delay=delay, reason=reason, exception=exception_name(exc))

    def _dead(
        self, delivery: Delivery, kind: FailureKind, reason: str, exc: BaseException | None
    ) -> DeadLetter:
        return DeadLetter(diagnose(delivery, kind, reason, exception=exception_name(exc)))
