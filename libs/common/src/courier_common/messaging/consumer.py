"""The consumer runner: decode, dispatch to a typed handler, then ack, retry or dead-letter.

One place decides what happens to every delivery (:meth:`ConsumerRunner._settle`):

* handler returned                -> ack                                   (``acked``)
* every effect was already done    -> ack                                   (``duplicate``)
* ``RetryableError`` / unexpected  -> publish to the next retry tier, ack   (``retried``)
* budget spent, ``PermanentError``,
  undecodable, no handler          -> publish to ``courier.dlx``, ack       (``dead_lettered``)

The republish is confirmed before the ack, so a crash in between duplicates a message but
never loses one. There is no ``nack(requeue=True)``: a message never spins in place. If the
dead-letter publish itself fails, the message is rejected without requeue and the work
queue's own at-least-once dead-lettering takes it to the same place.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel
from opentelemetry.trace import Span, Tracer

from courier_common.failpoints import failpoint
from courier_common.logging import get_logger
from courier_common.messaging import headers as names
from courier_common.messaging.connection import AmqpConnection
from courier_common.messaging.envelope import EnvelopeError, Event, EventCatalog, EventData
from courier_common.messaging.idempotency import IdempotencyStore, track_skips
from courier_common.messaging.publisher import (
    ATTEMPT_HEADER,
    OutgoingMessage,
    Publisher,
)
from courier_common.messaging.retry import PermanentError, RetryableError
from courier_common.messaging.topology import (
    DEAD_LETTER_EXCHANGE,
    DEFAULT_EXCHANGE,
    WorkQueue,
    declare_queue,
)
from courier_common.metrics import MessagingMetrics
from courier_common.tracing import get_tracer, process_span, record_failure

log = get_logger(__name__)

D = TypeVar("D", bound=EventData)
Handler = Callable[[Event[Any]], Awaitable[None]]

FAILURE_REASON = names.FAILURE_REASON
FAILURE_KIND = names.FAILURE_KIND
EXCEPTION = names.EXCEPTION
ORIGINAL_EXCHANGE = names.ORIGINAL_EXCHANGE
ORIGINAL_ROUTING_KEY = names.ORIGINAL_ROUTING_KEY
ORIGINAL_QUEUE = names.ORIGINAL_QUEUE
FIRST_FAILED_AT = names.FIRST_FAILED_AT
MAX_REASON_CHARS = 2000


class FailureKind:
    """Why a message was dead-lettered (the ``x-courier-failure-kind`` header)."""

    UNDECODABLE = "undecodable"
    NO_HANDLER = "no-handler"
    PERMANENT = "permanent"
    RETRIES_EXHAUSTED = "retries-exhausted"


@dataclass(frozen=True, slots=True)
class Delivery:
    """What a handler may want to know about the delivery it is handling."""

    queue: str
    attempt: int
    redelivered: bool
    exchange: str
    routing_key: str
    message_id: str | None


_delivery: contextvars.ContextVar[Delivery | None] = contextvars.ContextVar(
    "courier_delivery", default=None
)


def current_delivery() -> Delivery:
    """The delivery being handled; only valid inside a handler."""
    delivery = _delivery.get()
    if delivery is None:
        raise RuntimeError("current_delivery() called outside a message handler")
    return delivery


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


def attempt_of(headers: Mapping[str, Any] | None) -> int:
    """The attempt number in ``x-courier-attempt`` (1 when absent or unreadable)."""
    raw = (headers or {}).get(ATTEMPT_HEADER)
    if isinstance(raw, bytes):
        raw = raw.decode(errors="replace")
    try:
        value = int(raw) if raw is not None else 1
    except (TypeError, ValueError):
        return 1
    return max(value, 1)


def _header_str(headers: Mapping[str, Any], name: str) -> str | None:
    value = headers.get(name)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return None if value is None else str(value)


@dataclass(slots=True)
class _Decision:
    outcome: str
    event_type: str | None
    reason: str | None = None


class ConsumerRunner:
    """Consumes one work queue with up to ``prefetch`` messages handled concurrently."""

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
        self.connection = connection
        self.queue = queue
        self.router = router
        self.metrics = metrics
        self.consumer_name = consumer_name
        self.prefetch = prefetch
        self.idempotency = idempotency
        self.tracer = tracer or get_tracer("courier_common.consumer")
        metrics.add_event_types(router.catalog.types)
        metrics.use_consumer()
        self._channel: AbstractRobustChannel | None = None
        self._publisher: Publisher | None = None
        self._amqp_queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        """Subscribe. The topology must have been declared (see :func:`declare_topology`)."""
        self._channel = await self.connection.channel(prefetch=self.prefetch)
        publish_channel = await self.connection.channel()
        self._publisher = Publisher(publish_channel, metrics=self.metrics, tracer=self.tracer)
        # Declared (not passive) with the same arguments, so the robust queue can re-declare
        # it after a reconnect to a broker that lost it, and a mismatch still fails loudly.
        self._amqp_queue = await declare_queue(
            self._channel, self.queue.name, self.queue.arguments()
        )
        self._consumer_tag = await self._amqp_queue.consume(self._on_message)
        log.info("consumer_started", queue=self.queue.name, prefetch=self.prefetch)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # Our own task per message: up to ``prefetch`` run at once, and stop() can wait
        # for exactly these.
        task = asyncio.create_task(self._handle(message))
        self._tasks.add(task)
        self._idle.clear()
        self.metrics.in_flight.labels(self.queue.name).set(len(self._tasks))
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.metrics.in_flight.labels(self.queue.name).set(len(self._tasks))
        if not self._tasks:
            self._idle.set()

    async def stop(self, timeout: float = 25.0) -> bool:
        """Stop taking messages, let the in-flight ones finish and settle, then close.

        Returns True when everything in flight finished within ``timeout``. Whatever did not
        is cancelled unacked, so the broker redelivers it: late, never lost.
        """
        if self._amqp_queue is not None and self._consumer_tag is not None:
            try:
                await self._amqp_queue.cancel(self._consumer_tag)
            except Exception as exc:  # the connection may already be gone
                log.warning("consumer_cancel_failed", queue=self.queue.name, error=repr(exc))
            self._consumer_tag = None
        drained = True
        if self._tasks:
            log.info("consumer_draining", queue=self.queue.name, in_flight=len(self._tasks))
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                drained = False
                await _cancel_all(self._tasks)
        log.info("consumer_stopped", queue=self.queue.name, drained=drained)
        return drained

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        headers: dict[str, Any] = dict(message.headers or {})
        attempt = attempt_of(headers)
        started = time.perf_counter()
        with (
            process_span(
                self.tracer,
                queue=self.queue.name,
                headers=headers,
                message_id=message.message_id,
                routing_key=message.routing_key,
                exchange=message.exchange,
                body_size=len(message.body),
            ) as span,
            structlog.contextvars.bound_contextvars(
                event_id=message.message_id, queue=self.queue.name, attempt=attempt
            ),
        ):
            try:
                decision = await self._decide(message, headers, attempt, span)
            except Exception as exc:
                # Nothing may leave a delivery unsettled: it would hold a prefetch slot for
                # good. The broker dead-letters it (to courier.dlx) without our diagnosis.
                log.exception("message_handling_crashed", error=repr(exc))
                record_failure(span, exc, error_type="crashed")
                await self._reject(message)
                decision = _Decision("dead_lettered", None, f"handling crashed: {exc!r}")
            elapsed = time.perf_counter() - started
            event_label = self.metrics.event_type_label(decision.event_type)
            self.metrics.consumed.labels(self.queue.name, event_label, decision.outcome).inc()
            log_fields: dict[str, Any] = {
                "event_type": decision.event_type,
                "duration_ms": round(elapsed * 1000, 2),
            }
            if decision.reason:
                log_fields["reason"] = decision.reason
            if decision.outcome == "dead_lettered":
                log.warning("message_dead_lettered", **log_fields)
            elif decision.outcome == "retried":
                log.info("message_retried", **log_fields)
            else:
                log.info(f"message_{decision.outcome}", **log_fields)

    async def _decide(
        self,
        message: AbstractIncomingMessage,
        headers: dict[str, Any],
        attempt: int,
        span: Span,
    ) -> _Decision:
        try:
            event = self.router.catalog.decode(message.body, content_type=message.content_type)
        except EnvelopeError as exc:
            record_failure(span, exc, error_type="undecodable")
            return await self._dead_letter(
                message, headers, attempt, FailureKind.UNDECODABLE, exc.reason, exc, None
            )
        event_type = event.type
        handler = self.router.handler_for(event_type)
        if handler is None:  # catalog and handlers are registered together; defensive
            reason = f"no handler for event type '{event_type}'"
            return await self._dead_letter(
                message, headers, attempt, FailureKind.NO_HANDLER, reason, None, event_type
            )
        delivery = Delivery(
            queue=self.queue.name,
            attempt=attempt,
            redelivered=bool(message.redelivered),
            exchange=_header_str(headers, ORIGINAL_EXCHANGE) or message.exchange or "",
            routing_key=_header_str(headers, ORIGINAL_ROUTING_KEY) or message.routing_key or "",
            message_id=message.message_id,
        )
        token = _delivery.set(delivery)
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
            return await self._dead_letter(
                message, headers, attempt, FailureKind.PERMANENT, exc.reason, exc, event_type
            )
        except Exception as exc:
            record_failure(span, exc)
            reason = exc.reason if isinstance(exc, RetryableError) else f"{exc!r}"
            retry_after = exc.retry_after if isinstance(exc, RetryableError) else None
            return await self._retry(
                message, headers, attempt, reason, exc, event_type, retry_after
            )
        finally:
            _delivery.reset(token)
            self.metrics.handler_duration.labels(
                self.queue.name, self.metrics.event_type_label(event_type)
            ).observe(time.perf_counter() - started)
        self.metrics.event_age.labels(
            self.queue.name, self.metrics.event_type_label(event_type)
        ).observe(max(0.0, (datetime.now(UTC) - event.time).total_seconds()))
        failpoint("consumer.before_ack")
        await self._ack(message)
        if tracker.skipped and not tracker.ran:
            return _Decision("duplicate", event_type)
        return _Decision("acked", event_type)

    async def _retry(
        self,
        message: AbstractIncomingMessage,
        headers: dict[str, Any],
        attempt: int,
        reason: str,
        exc: BaseException,
        event_type: str,
        retry_after: float | None,
    ) -> _Decision:
        delay = self.queue.retry.next_delay(attempt, retry_after=retry_after)
        if delay is None:
            exhausted = f"gave up after {attempt} attempts; last error: {reason}"
            return await self._dead_letter(
                message, headers, attempt, FailureKind.RETRIES_EXHAUSTED, exhausted, exc, event_type
            )
        retry_headers = {k: v for k, v in headers.items() if k not in names.BROKER_DEATH}
        retry_headers[ATTEMPT_HEADER] = attempt + 1
        retry_headers.setdefault(ORIGINAL_EXCHANGE, message.exchange or "")
        retry_headers.setdefault(ORIGINAL_ROUTING_KEY, message.routing_key or "")
        retry_headers.setdefault(FIRST_FAILED_AT, datetime.now(UTC).isoformat())
        try:
            await self._republish(
                message, DEFAULT_EXCHANGE, self.queue.retry_queue_name(delay), retry_headers
            )
        except Exception as publish_exc:
            failed = f"retry publish failed ({publish_exc!r}); last error: {reason}"
            return await self._dead_letter(
                message, headers, attempt, FailureKind.RETRIES_EXHAUSTED, failed, exc, event_type
            )
        await self._ack(message)
        return _Decision("retried", event_type, f"{reason} (next attempt in {delay})")

    async def _dead_letter(
        self,
        message: AbstractIncomingMessage,
        headers: dict[str, Any],
        attempt: int,
        kind: str,
        reason: str,
        exc: BaseException | None,
        event_type: str | None,
    ) -> _Decision:
        dead_headers = dict(headers)
        dead_headers.update(
            {
                FAILURE_REASON: reason[:MAX_REASON_CHARS],
                FAILURE_KIND: kind,
                EXCEPTION: _exception_name(exc),
                ORIGINAL_EXCHANGE: _header_str(headers, ORIGINAL_EXCHANGE)
                or message.exchange
                or "",
                ORIGINAL_ROUTING_KEY: _header_str(headers, ORIGINAL_ROUTING_KEY)
                or message.routing_key
                or "",
                ORIGINAL_QUEUE: self.queue.name,
                ATTEMPT_HEADER: attempt,
            }
        )
        dead_headers.setdefault(FIRST_FAILED_AT, datetime.now(UTC).isoformat())
        routing_key = str(dead_headers[ORIGINAL_ROUTING_KEY]) or self.queue.name
        try:
            await self._republish(message, DEAD_LETTER_EXCHANGE, routing_key, dead_headers)
        except Exception as publish_exc:
            # Let the broker dead-letter it instead (at-least-once): the diagnosis headers are
            # lost, the message is not.
            log.error("dead_letter_publish_failed", error=repr(publish_exc), reason=reason)
            await self._reject(message)
            return _Decision("dead_lettered", event_type, reason)
        await self._ack(message)
        return _Decision("dead_lettered", event_type, reason)

    async def _republish(
        self,
        message: AbstractIncomingMessage,
        exchange: str,
        routing_key: str,
        headers: dict[str, Any],
    ) -> None:
        assert self._publisher is not None
        await self._publisher.publish(
            OutgoingMessage(
                exchange=exchange,
                routing_key=routing_key,
                body=message.body,
                message_id=message.message_id or _body_id(message.body),
                type=message.type,
                content_type=message.content_type,
                headers=_encodable(headers),
                timestamp=message.timestamp,
                correlation_id=message.correlation_id,
            )
        )

    async def _reject(self, message: AbstractIncomingMessage) -> None:
        try:
            await message.reject(requeue=False)
        except Exception as exc:  # the channel died: the broker redelivers it
            log.warning("reject_failed", error=repr(exc))

    async def _ack(self, message: AbstractIncomingMessage) -> None:
        try:
            await message.ack()
        except Exception as exc:
            # The channel died with the message unacked: the broker will redeliver it, and
            # idempotency turns the redelivery into a duplicate, not a second effect.
            log.warning("ack_failed", error=repr(exc))


async def _cancel_all(tasks: set[asyncio.Task[None]], *, within: float = 5.0) -> None:
    """Cancel *tasks* and wait for them, cancelling again while any is still running.

    On Python 3.11 ``asyncio.wait_for`` (redis-py sends every command through it) can swallow a
    cancellation that lands as the awaited call completes (CPython gh-86296), so one cancel
    is not always enough. Gives up after *within* seconds: what is left is unacked anyway and
    the broker redelivers it once the connection closes.
    """
    deadline = asyncio.get_running_loop().time() + within
    pending = [task for task in tasks if not task.done()]
    while pending and asyncio.get_running_loop().time() < deadline:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.1)
        pending = [task for task in pending if not task.done()]
    if pending:
        log.warning("consumer_tasks_not_cancelled", count=len(pending))


def _encodable(value: Any) -> Any:
    """Header values as the AMQP encoder takes them back.

    The decoder gives a long string that is not UTF-8 as ``bytes``, which the encoder refuses;
    as ``bytearray`` it goes out as the same bytes (a byte array), so a foreign publisher's
    odd header cannot stop its message from being retried or dead-lettered.
    """
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, dict):
        return {key: _encodable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_encodable(item) for item in value]
    return value


def _exception_name(exc: BaseException | None) -> str:
    if exc is None:
        return "none"
    cls = type(exc)
    return f"{cls.__module__}.{cls.__qualname__}"


def _body_id(body: bytes) -> str:
    """A stable id for a message that came without one, so its dead letter dedups."""
    return "sha256:" + hashlib.sha256(body).hexdigest()[:32]
