"""Persistent, confirmed, traced publishing.

Every publish is ``delivery_mode=2``, ``mandatory`` and waits for the broker's confirm, so
:meth:`Publisher.publish` returning means the broker has the message safely; an unroutable
message raises :class:`UnroutableError` instead of vanishing, and a full queue
(``x-overflow=reject-publish``) raises :class:`PublishNackedError`. A batch is pipelined:
every message goes out before the first confirm is awaited.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import aiormq
from aio_pika.abc import AbstractRobustChannel, DeliveryMode
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.trace import Tracer

from courier_common.messaging.envelope import CONTENT_TYPE, Event
from courier_common.messaging.topology import EVENTS_EXCHANGE
from courier_common.messaging.tracing import inject_context, publish_span
from courier_common.metrics import MessagingMetrics
from courier_common.tracing import get_tracer, record_failure


class PublishError(Exception):
    """The broker did not take responsibility for the message; it was not published."""


class UnroutableError(PublishError):
    """No queue is bound for this exchange and routing key (basic.return)."""


class PublishNackedError(PublishError):
    """The broker refused the message (e.g. the queue is full with reject-publish)."""


class PublishTimeoutError(PublishError):
    """No confirm arrived in time; the broker may or may not have the message."""


class PublishConnectionError(PublishError):
    """The connection or channel was down; the message was not (certainly) published."""


@dataclass(slots=True)
class OutgoingMessage:
    """One message to publish: body and AMQP properties, before trace headers."""

    exchange: str
    routing_key: str
    body: bytes
    message_id: str | None = None
    type: str | None = None
    content_type: str | None = CONTENT_TYPE
    headers: dict[str, Any] = field(default_factory=dict)
    timestamp: datetime | None = None
    correlation_id: str | None = None
    #: The trace this publish belongs to, when it is not the current one (the outbox relay
    #: publishes on behalf of a request that has long returned).
    trace_context: Context | None = None

    @classmethod
    def for_event(
        cls,
        event: Event[Any],
        *,
        exchange: str = EVENTS_EXCHANGE,
        routing_key: str | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> OutgoingMessage:
        """The message for a domain event: routed by its type, ``message_id`` = event id."""
        return cls(
            exchange=exchange,
            routing_key=routing_key or event.type,
            body=event.encode(),
            message_id=str(event.id),
            type=event.type,
            headers=dict(headers or {}),
            timestamp=event.time,
        )


def _where(message: OutgoingMessage) -> str:
    return f"exchange '{message.exchange}' with routing key '{message.routing_key}'"


def _being_cancelled() -> bool:
    """True when the current task itself was asked to stop (``Task.cancel()``)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Publisher:
    """Publishes on one confirm channel; the channel must have ``on_return_raises``."""

    def __init__(
        self,
        channel: AbstractRobustChannel,
        *,
        metrics: MessagingMetrics | None = None,
        tracer: Tracer | None = None,
        confirm_timeout: float = 30.0,
    ) -> None:
        self.channel = channel
        self.metrics = metrics
        self.tracer = tracer or get_tracer("courier_common.publisher")
        self.confirm_timeout = confirm_timeout

    async def publish(self, message: OutgoingMessage) -> None:
        """Publish and wait for the confirm; raise a :class:`PublishError` otherwise."""
        if message.trace_context is None:
            await self._publish_traced(message)
            return
        token = otel_context.attach(message.trace_context)
        try:
            await self._publish_traced(message)
        finally:
            otel_context.detach(token)

    async def _publish_traced(self, message: OutgoingMessage) -> None:
        with publish_span(
            self.tracer,
            exchange=message.exchange,
            routing_key=message.routing_key,
            message_id=message.message_id,
            body_size=len(message.body),
        ) as span:
            headers = dict(message.headers)
            inject_context(headers)
            outcome = "failed"
            try:
                await self._publish_raw(message, headers)
                outcome = "confirmed"
            except UnroutableError as exc:
                outcome = "returned"
                record_failure(span, exc, error_type="unroutable")
                raise
            except PublishNackedError as exc:
                outcome = "nacked"
                record_failure(span, exc, error_type="nacked")
                raise
            except PublishError as exc:
                record_failure(span, exc)
                raise
            finally:
                if self.metrics is not None:
                    self.metrics.published.labels(message.exchange or "amq.default", outcome).inc()

    async def _publish_raw(self, message: OutgoingMessage, headers: dict[str, Any]) -> None:
        properties = aiormq.spec.Basic.Properties(
            headers=headers,
            content_type=message.content_type,
            delivery_mode=DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            message_type=message.type,
            timestamp=message.timestamp or datetime.now(UTC),
            correlation_id=message.correlation_id,
        )
        try:
            if self.channel.is_closed:
                raise aiormq.exceptions.ChannelInvalidStateError("the channel is closed")
            # aiormq's abstract channel does not declare ``wait``; its one implementation has.
            channel = cast(aiormq.Channel, await self.channel.get_underlay_channel())
            # Straight to aiormq with wait=False: the frame is queued for the connection's
            # writer and we wait for the broker's confirm only. aio-pika's Exchange.publish
            # holds the channel lock until the writer task has flushed the frame, so a batch
            # went out one event-loop turn per message; this pipelines it, in order, on one
            # channel. The confirm still means the broker has the message.
            await channel.basic_publish(
                message.body,
                exchange=message.exchange,
                routing_key=message.routing_key,
                properties=properties,
                mandatory=True,
                timeout=self.confirm_timeout,
                wait=False,
            )
        except aiormq.exceptions.PublishError as exc:
            raise UnroutableError(
                f"no queue is bound to {_where(message)}: message returned"
            ) from exc
        except aiormq.exceptions.DeliveryError as exc:
            raise PublishNackedError(
                f"broker refused the message to {_where(message)} (queue full or unavailable)"
            ) from exc
        except TimeoutError as exc:
            raise PublishTimeoutError(
                f"no confirm within {self.confirm_timeout}s for {_where(message)}"
            ) from exc
        except (
            aiormq.exceptions.AMQPError,
            ConnectionError,
            RuntimeError,
        ) as exc:
            raise PublishConnectionError(
                f"could not publish to {_where(message)}: {exc!r}"
            ) from exc
        except asyncio.CancelledError as exc:
            if _being_cancelled():
                raise
            # Not our task's cancellation: aiormq fails the pending confirm (and drain) with a
            # CancelledError when it drops a connection it found stuck (no heartbeat). Let it
            # through and a caller that only expects PublishError (the outbox relay) dies.
            raise PublishConnectionError(
                f"the connection was dropped while publishing to {_where(message)}"
            ) from exc

    async def publish_event(
        self,
        event: Event[Any],
        *,
        exchange: str = EVENTS_EXCHANGE,
        routing_key: str | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> None:
        await self.publish(
            OutgoingMessage.for_event(
                event, exchange=exchange, routing_key=routing_key, headers=headers
            )
        )

    async def publish_many(self, messages: Sequence[OutgoingMessage]) -> list[PublishError | None]:
        """Publish a batch with pipelined confirms; one result per message, in order.

        ``None`` means confirmed. Each failure is returned, not raised, so the caller can
        acknowledge exactly the confirmed ones (the outbox relay does).
        """

        async def one(message: OutgoingMessage) -> PublishError | None:
            try:
                await self.publish(message)
            except PublishError as exc:
                return exc
            return None

        return list(await asyncio.gather(*(one(m) for m in messages)))
