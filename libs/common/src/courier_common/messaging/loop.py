"""The delivery loop: subscribe, hand each delivery to a handler, settle what it decided.

Every consumer in Courier stands on :class:`DeliveryLoop` — the typed event runner
(:class:`~courier_common.messaging.consumer.ConsumerRunner`) and the dlq-archiver alike. The
loop owns everything about AMQP on the way in:

* a channel with ``prefetch`` unacked messages at most, and the queue declared (not passive)
  with its arguments, so the robust channel can re-declare it after a reconnect;
* a task per message (the one aio-pika runs its callback in), so up to ``prefetch`` are
  handled at once and :meth:`stop` can wait for exactly those;
* a ``process <queue>`` span per delivery, continuing the publisher's trace;
* :meth:`settle`, the one place a delivery is acked, retried, dead-lettered, requeued or
  rejected (see :mod:`courier_common.messaging.settlement`). A handler that raises gets its
  ``on_crash`` settlement; a settlement that cannot be applied falls back to one that keeps
  the message. Nothing leaves a delivery unsettled: it would hold a prefetch slot for good;
* :meth:`stop`: cancel the subscription, let what is in flight finish within a timeout, and
  cancel the rest unacked (the broker redelivers it: late, never lost).

Acks decided in the same turn of the event loop share frames (``acks.py``): one
``basic.ack(multiple=True)`` covers a run of them when every delivery the channel holds up to
that tag is ready to ack.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel
from opentelemetry.trace import Tracer

from courier_common.logging import get_logger
from courier_common.messaging.acks import AckBatcher
from courier_common.messaging.connection import AmqpConnection
from courier_common.messaging.deadletter import (
    FailureKind,
    dead_letter_headers,
    retry_headers,
)
from courier_common.messaging.delivery import Delivery, diagnose, set_current
from courier_common.messaging.publisher import OutgoingMessage, Publisher
from courier_common.messaging.settlement import (
    Ack,
    DeadLetter,
    Reject,
    Requeue,
    Retry,
    Settlement,
)
from courier_common.messaging.topology import (
    DEAD_LETTER_EXCHANGE,
    DEFAULT_EXCHANGE,
    DeadLetterQueue,
    WorkQueue,
    declare_queue,
)
from courier_common.messaging.tracing import process_span
from courier_common.metrics import MessagingMetrics
from courier_common.tasks import cancel_and_wait
from courier_common.tracing import get_tracer, record_failure

log = get_logger(__name__)


class DeliveryHandler(Protocol):
    """What a loop hands each delivery to."""

    async def handle(self, delivery: Delivery) -> Settlement:
        """Decide what becomes of ``delivery``; never ack, never publish a retry yourself."""
        ...

    def on_crash(self, delivery: Delivery, exc: Exception) -> Settlement:
        """The settlement when :meth:`handle` raised instead of deciding."""
        ...

    def settled(self, delivery: Delivery, settlement: Settlement, seconds: float) -> None:
        """Told what was done in the end (after any fallback), and how long it all took."""
        ...


class DeliveryLoop:
    """Consumes one queue with up to ``prefetch`` deliveries handled concurrently."""

    def __init__(
        self,
        *,
        connection: AmqpConnection,
        queue: WorkQueue | DeadLetterQueue,
        handler: DeliveryHandler,
        prefetch: int = 32,
        metrics: MessagingMetrics | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.connection = connection
        self.queue = queue
        self.handler = handler
        self.prefetch = prefetch
        self.metrics = metrics
        self.tracer = tracer or get_tracer("courier_common.consumer")
        if metrics is not None:
            metrics.use_consumer()
        self._in_flight_gauge = None if metrics is None else metrics.in_flight.labels(queue.name)
        #: Reject is only safe where the queue dead-letters what it rejects.
        self._rejects_to_dlx = "x-dead-letter-exchange" in queue.arguments()
        self._publisher: Publisher | None = None
        self._amqp_queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Acks of one loop turn share frames (a multiple ack where it is safe).
        self._acks = AckBatcher()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        """Subscribe. The exchanges the queue's arguments name must exist (declare_topology)."""
        channel: AbstractRobustChannel = await self.connection.channel(prefetch=self.prefetch)
        self._publisher = Publisher(
            await self.connection.channel(), metrics=self.metrics, tracer=self.tracer
        )
        # Declared (not passive) with the same arguments, so the robust queue can re-declare
        # it after a reconnect to a broker that lost it, and a mismatch still fails loudly.
        self._amqp_queue = await declare_queue(channel, self.queue.name, self.queue.arguments())
        self._consumer_tag = await self._amqp_queue.consume(self._on_message)
        log.info("consumer_started", queue=self.queue.name, prefetch=self.prefetch)

    async def stop(self, timeout: float = 25.0) -> bool:
        """Stop taking messages, let the in-flight ones finish and settle, then return.

        True when everything in flight finished within ``timeout``. Whatever did not is
        cancelled unacked, so the broker redelivers it: late, never lost.
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
                await cancel_and_wait(self._tasks, timeout=5.0)
        log.info("consumer_stopped", queue=self.queue.name, drained=drained)
        return drained

    # --- one delivery ---------------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # aio-pika already runs each delivery's callback in a task of its own: that task is the
        # delivery's, up to ``prefetch`` run at once, and stop() waits for exactly these.
        task = asyncio.current_task()
        assert task is not None
        if message.delivery_tag is not None:
            self._acks.delivered(message.channel, message.delivery_tag)
        self._tasks.add(task)
        self._idle.clear()
        if self._in_flight_gauge is not None:
            self._in_flight_gauge.set(len(self._tasks))
        try:
            await self._run(message)
        finally:
            self._forget(task)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if self._in_flight_gauge is not None:
            self._in_flight_gauge.set(len(self._tasks))
        if not self._tasks:
            self._idle.set()

    async def _run(self, message: AbstractIncomingMessage) -> None:
        started = time.perf_counter()
        delivery = _delivery(self.queue.name, message)
        set_current(delivery)  # this task's own context: no reset needed
        with (
            process_span(
                self.tracer,
                queue=self.queue.name,
                headers=delivery.headers,
                message_id=delivery.message_id,
                routing_key=delivery.routing_key,
                exchange=delivery.exchange,
                body_size=len(delivery.body),
            ) as span,
            structlog.contextvars.bound_contextvars(
                event_id=delivery.message_id, queue=self.queue.name, attempt=delivery.attempt
            ),
        ):
            try:
                settlement = await self.handler.handle(delivery)
            except Exception as exc:
                log.exception("message_handling_crashed", error=repr(exc))
                record_failure(span, exc, error_type="crashed")
                settlement = self.handler.on_crash(delivery, exc)
            applied = await self.settle(message, delivery, settlement)
            self.handler.settled(delivery, applied, time.perf_counter() - started)

    async def settle(
        self, message: AbstractIncomingMessage, delivery: Delivery, settlement: Settlement
    ) -> Settlement:
        """Apply ``settlement`` to the delivery; return what was applied in the end.

        Retry and dead-letter publishes are confirmed before the ack, so a crash in between
        duplicates a message and never loses one. A retry that cannot be published is
        dead-lettered; a dead letter that cannot be published is rejected, and the queue's
        own at-least-once dead-lettering takes it to the same place, without our diagnosis.
        """
        try:
            match settlement:
                case Ack():
                    await self._ack(message)
                case Retry(delay=delay, reason=reason, exception=exception):
                    if not isinstance(self.queue, WorkQueue):
                        raise TypeError(f"{self.queue.name} has no retry tiers")
                    try:
                        await self._republish(
                            delivery,
                            DEFAULT_EXCHANGE,
                            self.queue.retry_queue_name(delay),
                            retry_headers(
                                delivery.headers,
                                attempt=delivery.attempt,
                                exchange=delivery.exchange,
                                routing_key=delivery.routing_key,
                            ),
                        )
                    except Exception as exc:
                        failed = DeadLetter(
                            diagnose(
                                delivery,
                                FailureKind.RETRIES_EXHAUSTED,
                                f"retry publish failed ({exc!r}); last error: {reason}",
                                exception=exception,
                            )
                        )
                        return await self.settle(message, delivery, failed)
                    await self._ack(message)
                case DeadLetter(diagnosis=diagnosis):
                    if not self._rejects_to_dlx:
                        raise TypeError(f"{self.queue.name} does not dead-letter")
                    try:
                        await self._republish(
                            delivery,
                            DEAD_LETTER_EXCHANGE,
                            delivery.original_routing_key or self.queue.name,
                            dead_letter_headers(delivery.headers, diagnosis),
                        )
                    except Exception as exc:
                        log.error(
                            "dead_letter_publish_failed", error=repr(exc), reason=diagnosis.reason
                        )
                        return await self.settle(message, delivery, Reject(diagnosis.reason))
                    await self._ack(message)
                case Requeue():
                    await self._nack(message, requeue=True)
                case Reject():
                    await self._nack(message, requeue=False)
        except Exception as exc:  # a settlement this queue cannot take: keep the message
            log.exception("settle_failed", error=repr(exc), settlement=type(settlement).__name__)
            fallback: Settlement = (
                Reject(f"could not settle: {exc!r}")
                if self._rejects_to_dlx
                else Requeue(f"could not settle: {exc!r}")
            )
            await self._nack(message, requeue=isinstance(fallback, Requeue))
            return fallback
        return settlement

    async def _republish(
        self, delivery: Delivery, exchange: str, routing_key: str, headers: dict[str, Any]
    ) -> None:
        assert self._publisher is not None, "start() first"
        await self._publisher.publish(
            OutgoingMessage(
                exchange=exchange,
                routing_key=routing_key,
                body=delivery.body,
                message_id=delivery.message_id or _body_id(delivery.body),
                type=delivery.type,
                content_type=delivery.content_type,
                headers=_encodable(headers),
                timestamp=delivery.timestamp,
                correlation_id=delivery.correlation_id,
            )
        )

    async def _ack(self, message: AbstractIncomingMessage) -> None:
        try:
            assert message.delivery_tag is not None
            await self._acks.ack(message.channel, message.delivery_tag)
        except Exception as exc:
            # The channel died with the message unacked: the broker will redeliver it, and
            # idempotency turns the redelivery into a duplicate, not a second effect.
            log.warning("ack_failed", error=repr(exc))

    async def _nack(self, message: AbstractIncomingMessage, *, requeue: bool) -> None:
        try:
            if requeue:
                await message.nack(requeue=True)
            else:
                await message.reject(requeue=False)
        except Exception as exc:  # the channel died: the broker redelivers it
            log.warning("reject_failed" if not requeue else "requeue_failed", error=repr(exc))
            return
        if message.delivery_tag is not None:
            self._acks.released(message.channel, message.delivery_tag)


def _delivery(queue: str, message: AbstractIncomingMessage) -> Delivery:
    """Courier's view of an aio-pika delivery: plain values only."""
    return Delivery(
        queue=queue,
        body=message.body,
        headers=dict(message.headers or {}),
        exchange=message.exchange or "",
        routing_key=message.routing_key or "",
        redelivered=bool(message.redelivered),
        message_id=message.message_id,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        type=message.type,
        timestamp=_aware(message.timestamp),
        correlation_id=message.correlation_id,
        app_id=message.app_id,
        delivery_mode=int(message.delivery_mode) if message.delivery_mode else None,
    )


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _encodable(value: Any) -> Any:
    """Header values as the AMQP encoder takes them back.

    The decoder gives a long string that is not UTF-8 as ``bytes``, which the encoder refuses;
    as ``bytearray`` it goes out as the same bytes (a byte array), so a foreign publisher's
    odd header cannot stop its message from being retried or dead-lettered.
    """
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, Mapping):
        return {key: _encodable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_encodable(item) for item in value]
    return value


def _body_id(body: bytes) -> str:
    """A stable id for a message that came without one, so its dead letter dedups."""
    return "sha256:" + hashlib.sha256(body).hexdigest()[:32]
