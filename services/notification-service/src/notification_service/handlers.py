"""What to send for each user event, on which channel, exactly once per channel.

The handlers are business functions of :class:`Notifier`: they take a typed event and raise
``RetryableError`` or ``PermanentError``; the runner in ``courier_common`` acks, retries or
dead-letters. Each (event, channel) send is wrapped in the idempotency protocol, so when
email went out and SMS failed, the retry sends only the SMS.

Each channel gets its own CLIENT span, ``send <channel>``, a child of the delivery's process
span, whatever happened: sent, skipped (already sent), retryable or permanent failure.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Final

import httpx
from opentelemetry.trace import SpanKind, Tracer
from prometheus_client import CollectorRegistry, Counter, Histogram
from redis.asyncio import Redis

from courier_common.events import Channel, UserContact, UserDeleted, UserRegistered, UserUpdated
from courier_common.logging import get_logger
from courier_common.messaging import (
    Event,
    IdempotencyStore,
    PermanentError,
    RetryableError,
    Router,
)
from courier_common.metrics import AGE_BUCKETS, HANDLER_BUCKETS, MessagingMetrics
from courier_common.redis import Durability
from courier_common.tracing import SERVER_ADDRESS, SERVER_PORT, get_tracer, operation_span
from notification_service.config import Settings
from notification_service.rendering import Renderer
from notification_service.senders import EmailSender, HttpProvider, failure_type, message_id

log = get_logger(__name__)
ContactEvent = Event[UserRegistered] | Event[UserUpdated]

# Span attributes of a send; the outcome takes the values of the sends metric's label.
CHANNEL_ATTRIBUTE: Final = "courier.notification.channel"
TEMPLATE_ATTRIBUTE: Final = "courier.notification.template"
OUTCOME_ATTRIBUTE: Final = "courier.notification.outcome"


def _send_error_type(exc: BaseException) -> str | None:
    """``error.type`` of a failed send: from the sender's cause, else retryable/permanent."""
    named = failure_type(exc)
    if named is not None:
        return named
    if isinstance(exc, RetryableError):
        return "retryable"  # e.g. another worker holds the claim
    if isinstance(exc, PermanentError):
        return "permanent"  # e.g. the event lacks the phone number the channel needs
    return None  # a bug: its class name


class NotificationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.sends = Counter(
            "courier_notifications",
            "Notification sends by channel and outcome: sent, skipped (already sent), "
            "retryable or permanent failure.",
            ["channel", "outcome"],
            registry=registry,
        )
        self.send_duration = Histogram(
            "courier_notification_send_duration_seconds",
            "Time one send took, by channel, successful or not.",
            ["channel"],
            buckets=HANDLER_BUCKETS,
            registry=registry,
        )
        self.event_age = Histogram(
            "courier_notification_event_age_seconds",
            "Age of the event when its notification was sent: registration-to-inbox lag.",
            ["channel"],
            buckets=AGE_BUCKETS,
            registry=registry,
        )


class Notifier:
    """Turns user events into sends."""

    def __init__(
        self,
        *,
        email: EmailSender,
        sms: HttpProvider,
        push: HttpProvider,
        renderer: Renderer,
        idempotency: IdempotencyStore,
        redis: Redis,
        prefix: str,
        metrics: NotificationMetrics,
        consumer_name: str = "notification-service",
        erased_ttl_seconds: int = 30 * 24 * 3600,
        tracer: Tracer | None = None,
        durability: Durability | None = None,
    ) -> None:
        self.email = email
        self.sms = sms
        self.push = push
        self.renderer = renderer
        self.idempotency = idempotency
        self.redis = redis
        self.prefix = prefix
        self.metrics = metrics
        self.consumer_name = consumer_name
        self.erased_ttl_seconds = erased_ttl_seconds
        self.tracer = tracer or get_tracer("notification_service")
        self.durability = durability or Durability(fence_key=f"{prefix}replication-fence")

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        redis: Redis,
        http: httpx.AsyncClient,
        metrics: NotificationMetrics,
        messaging_metrics: MessagingMetrics,
    ) -> Notifier:
        """The notifier the service runs: senders, idempotency and retention from settings."""
        password = settings.smtp_password.get_secret_value() if settings.smtp_password else None
        return cls(
            email=EmailSender(
                host=settings.smtp_host,
                port=settings.smtp_port,
                sender=settings.smtp_from,
                timeout=settings.smtp_timeout_seconds,
                username=settings.smtp_username,
                password=password,
                start_tls=settings.smtp_starttls,
            ),
            sms=HttpProvider(
                channel="sms",
                url=settings.sms_url,
                token=settings.sms_token.get_secret_value(),
                client=http,
            ),
            push=HttpProvider(
                channel="push",
                url=settings.push_url,
                token=settings.push_token.get_secret_value(),
                client=http,
            ),
            renderer=Renderer(),
            idempotency=IdempotencyStore(
                redis,
                prefix=settings.redis_prefix,
                lease_seconds=settings.idempotency_lease_seconds,
                retention_seconds=settings.idempotency_retention_seconds,
                metrics=messaging_metrics,
            ),
            redis=redis,
            prefix=settings.redis_prefix,
            metrics=metrics,
            erased_ttl_seconds=settings.erased_user_retention_seconds,
            durability=settings.redis_durability(),
        )

    def router(self) -> Router:
        router = Router()
        router.add(UserRegistered, self.on_user_registered)
        router.add(UserUpdated, self.on_user_updated)
        router.add(UserDeleted, self.on_user_deleted)
        return router

    def _erased_key(self, user_id: object) -> str:
        return f"{self.prefix}notif:erased:{user_id}"

    async def on_user_registered(self, event: Event[UserRegistered]) -> None:
        """A welcome on each channel the user chose."""
        await self._deliver_all(event, "welcome", list(event.data.channels))

    async def on_user_updated(self, event: Event[UserUpdated]) -> None:
        """A short confirmation on each newly enabled channel; nothing otherwise."""
        data = event.data
        enabled = [c for c in data.channels if c not in data.previous_channels]
        if enabled:
            await self._deliver_all(event, "channel_enabled", enabled)

    async def on_user_deleted(self, event: Event[UserDeleted]) -> None:
        """Remember only that the user is gone, so a welcome still in retry is not sent.

        This service keeps no profile data: contact details live in the events themselves.
        The mark is confirmed by the replicas (``COURIER_REDIS_MIN_REPLICAS``) before the event
        is acknowledged: a failover that lost it would let that welcome out after all. When
        they do not confirm, the event is retried (setting the mark again is harmless).
        """
        key = self._erased_key(event.data.user_id)
        await self.durability.commands(
            self.redis, lambda pipe: pipe.set(key, "1", ex=self.erased_ttl_seconds)
        )
        log.info("user_forgotten", user_id=str(event.data.user_id))

    async def _deliver_all(
        self,
        event: Event[UserRegistered] | Event[UserUpdated],
        template: str,
        channels: list[Channel],
    ) -> None:
        if await self.redis.exists(self._erased_key(event.data.user_id)):
            log.info("notification_skipped_user_erased", user_id=str(event.data.user_id))
            return
        results = await asyncio.gather(
            *(self._deliver(event, template, channel) for channel in channels),
            return_exceptions=True,
        )
        failures = [
            (channel, result)
            for channel, result in zip(channels, results, strict=True)
            if isinstance(result, BaseException)
        ]
        if not failures:
            return
        for _, error in failures:
            if not isinstance(error, (RetryableError, PermanentError)):
                raise error  # a bug: the runner retries it and the logs show it
        summary = "; ".join(f"{channel}: {error}" for channel, error in failures)
        retryable = [e for _, e in failures if isinstance(e, RetryableError)]
        if retryable:
            waits = [e.retry_after for e in retryable if e.retry_after is not None]
            raise RetryableError(summary, retry_after=max(waits) if waits else None)
        raise PermanentError(summary)

    def _server(self, channel: Channel) -> tuple[str, int]:
        sender = self.email if channel == "email" else self.sms if channel == "sms" else self.push
        return sender.server_address, sender.server_port

    async def _deliver(self, event: ContactEvent, template: str, channel: Channel) -> None:
        key = self.idempotency.key(self.consumer_name, str(event.id), channel)
        address, port = self._server(channel)

        async def send() -> bool:
            started = time.perf_counter()
            try:
                await self._send(event, template, channel)
            except RetryableError:
                self.metrics.sends.labels(channel, "retryable").inc()
                raise
            except PermanentError:
                self.metrics.sends.labels(channel, "permanent").inc()
                raise
            finally:
                self.metrics.send_duration.labels(channel).observe(time.perf_counter() - started)
            self.metrics.sends.labels(channel, "sent").inc()
            self.metrics.event_age.labels(channel).observe(
                max(0.0, (datetime.now(UTC) - event.time).total_seconds())
            )
            log.info("notification_sent", channel=channel, template=template)
            return True

        with operation_span(
            self.tracer,
            f"send {channel}",
            kind=SpanKind.CLIENT,
            attributes={
                CHANNEL_ATTRIBUTE: channel,
                TEMPLATE_ATTRIBUTE: template,
                SERVER_ADDRESS: address,
                SERVER_PORT: port,
            },
            error_type=_send_error_type,
        ) as span:
            try:
                sent = await self.idempotency.run_once(key, send)
            except RetryableError:
                span.set_attribute(OUTCOME_ATTRIBUTE, "retryable")
                raise
            except PermanentError:
                span.set_attribute(OUTCOME_ATTRIBUTE, "permanent")
                raise
            if sent is None:
                span.set_attribute(OUTCOME_ATTRIBUTE, "skipped")
                self.metrics.sends.labels(channel, "skipped").inc()
                log.info("notification_already_sent", channel=channel, template=template)
            else:
                span.set_attribute(OUTCOME_ATTRIBUTE, "sent")

    async def _send(self, event: ContactEvent, template: str, channel: Channel) -> None:
        user: UserContact = event.data
        event_id = str(event.id)
        values = {"name": user.display_name, "channels": list(user.channels), "channel": channel}
        if channel == "email":
            content = self.renderer.email(template, user.locale, **values)
            await self.email.send(
                to=user.email,
                subject=content.subject,
                text=content.text,
                html=content.html,
                msg_id=message_id(event_id, template, self.email.domain),
                locale=content.locale,
            )
        elif channel == "sms":
            if not user.phone:
                raise PermanentError("sms chosen but the event has no phone number")
            sms = self.renderer.sms(template, user.locale, **values)
            await self.sms.send(
                {"to": user.phone, "text": sms.text, "locale": sms.locale, "reference": event_id},
                idempotency_key=f"{event_id}:sms",
            )
        else:
            if not user.push_token:
                raise PermanentError("push chosen but the event has no push token")
            push = self.renderer.push(template, user.locale, **values)
            await self.push.send(
                {
                    "token": user.push_token,
                    "title": push.title,
                    "body": push.text,
                    "locale": push.locale,
                    "reference": event_id,
                },
                idempotency_key=f"{event_id}:push",
            )
