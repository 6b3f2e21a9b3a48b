"""Archive every message of ``courier.dead-letters``, whatever it contains.

The archiver is a raw handler on courier_common's delivery loop (no typed decoding: a dead
letter may be any bytes, and dead-lettering a dead letter would loop). It stores, then acks.
When Redis is unavailable it keeps the delivery (unacked) and retries the store with backoff:
a dead letter leaves the queue only once it is in the archive. Stopping, it gives such a
delivery back to the queue (requeue), so the next archiver stores it.

The loop handles each delivery in a ``process courier.dead-letters`` span whose parent is the
dead-letter publish (from the message's ``traceparent``), so the archive closes the trace of
the message that died.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any, Final

import redis.exceptions
from opentelemetry.trace import Span, Tracer, get_current_span
from prometheus_client import CollectorRegistry, Counter, Gauge

from courier_common.backoff import Backoff
from courier_common.failpoints import failpoint
from courier_common.logging import get_logger
from courier_common.messaging import (
    DEAD_LETTERS,
    Ack,
    AmqpConnection,
    DeadLetterQueue,
    Delivery,
    DeliveryLoop,
    Requeue,
    Settlement,
    new_event_id,
)
from courier_common.metrics import MessagingMetrics
from courier_common.tasks import pause
from dlq_archiver.records import DeadLetterRecord, from_delivery
from dlq_archiver.store import Archive, id_time

log = get_logger(__name__)

#: Span attributes of an archived delivery.
RECORD_ID_ATTRIBUTE: Final = "courier.dead_letter.record_id"
OUTCOME_ATTRIBUTE: Final = "courier.dead_letter.outcome"


class ArchiverMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.archived = Counter(
            "courier_dead_letters_archived",
            "Dead letters archived, by the queue they died in and the class of reason.",
            ["source_queue", "reason_class"],
            registry=registry,
        )
        self.duplicates = Counter(
            "courier_dead_letters_duplicate",
            "Dead letters delivered again and recognised as already archived.",
            registry=registry,
        )
        self.archive_size = Gauge(
            "courier_dead_letters_stored", "Dead letters in the archive.", registry=registry
        )
        self.oldest_age = Gauge(
            "courier_dead_letters_oldest_age_seconds",
            "Age of the oldest archived dead letter (0 when empty).",
            registry=registry,
        )
        self.replays = Counter(
            "courier_replays",
            "Replays by outcome: published, refused (erased, or its queue unknown or gone), "
            "failed_again.",
            ["outcome"],
            registry=registry,
        )
        self.group_size = Gauge(
            "courier_dead_letter_group_size",
            "Dead letters in each of the largest failure groups (top N only).",
            ["fingerprint", "source_queue", "event_type"],
            registry=registry,
        )


class ArchiveConsumer:
    """The archiving handler, on its own delivery loop over ``courier.dead-letters``."""

    def __init__(
        self,
        *,
        connection: AmqpConnection,
        archive: Archive,
        metrics: ArchiverMetrics,
        messaging_metrics: MessagingMetrics | None = None,
        queue: DeadLetterQueue = DEAD_LETTERS,
        prefetch: int = 50,
        tracer: Tracer | None = None,
    ) -> None:
        self.archive = archive
        self.metrics = metrics
        self._stopping = asyncio.Event()
        self.loop = DeliveryLoop(
            connection=connection,
            queue=queue,
            handler=self,
            prefetch=prefetch,
            metrics=messaging_metrics,
            tracer=tracer,
        )

    @property
    def queue_name(self) -> str:
        return self.loop.queue.name

    async def start(self) -> None:
        await self.loop.start()
        log.info("archiver_started", queue=self.queue_name)

    async def stop(self, timeout: float = 10.0) -> bool:
        """Stop taking dead letters and let the ones in hand finish, within ``timeout``.

        True when every one finished. One still waiting for Redis is given back to the queue;
        one that did not finish in time is cancelled unacked: either way the broker delivers
        it again, and the archive recognises what it already stored.
        """
        self._stopping.set()
        drained = await self.loop.stop(timeout)
        log.info("archiver_stopped", queue=self.queue_name, drained=drained)
        return drained

    # --- DeliveryHandler ------------------------------------------------------------------

    async def handle(self, delivery: Delivery) -> Settlement:
        span = get_current_span()
        record = from_delivery(delivery, record_id=str(new_event_id()), now=datetime.now(UTC))
        backoff = Backoff(initial=0.2, maximum=5.0)
        while True:
            try:
                existing = await self.archive.insert(record)
                break
            except Exception as exc:  # Redis away, or a bug: keep it in hand, with backoff
                if not isinstance(exc, redis.exceptions.RedisError):
                    log.exception("archive_store_crashed", message_id=record.message_id)
                if self._stopping.is_set():
                    span.set_attribute(OUTCOME_ATTRIBUTE, "left_for_redelivery")
                    log.warning(
                        "dead_letter_left_for_redelivery",
                        message_id=record.message_id,
                        error=repr(exc),
                    )
                    return Requeue(f"the archive is unavailable: {exc!r}")
                delay = backoff.next()
                log.warning("archive_store_failed", error=repr(exc), retry_in_s=delay)
                await pause(self._stopping, delay)
        await self._record(record, existing, span)
        failpoint("archiver.before_ack")
        return Ack(duplicate=existing is not None)

    def on_crash(self, delivery: Delivery, exc: Exception) -> Settlement:
        # Never reject: courier.dead-letters has nowhere to dead-letter to. Keep it.
        return Requeue(f"archiving crashed: {exc!r}")

    def settled(self, delivery: Delivery, settlement: Settlement, seconds: float) -> None:
        pass  # the archive's own metrics and log lines are written as it stores

    async def _record(self, record: DeadLetterRecord, existing: str | None, span: Span) -> None:
        if existing is not None:
            span.set_attributes({RECORD_ID_ATTRIBUTE: existing, OUTCOME_ATTRIBUTE: "duplicate"})
            self.metrics.duplicates.inc()
            await self._link_replay(record, existing)  # the first delivery may have stopped short
            log.info("dead_letter_duplicate", record_id=existing, message_id=record.message_id)
            return
        span.set_attributes({RECORD_ID_ATTRIBUTE: record.id, OUTCOME_ATTRIBUTE: "archived"})
        self.metrics.archived.labels(record.source_queue, record.reason_class).inc()
        await self._link_replay(record, record.id)
        if record.replay_of:
            self.metrics.replays.labels("failed_again").inc()
        log.info("dead_letter_archived", **record.log_fields())

    async def _link_replay(self, record: DeadLetterRecord, record_id: str) -> None:
        """A replayed message that failed again points back to the record it was replayed from.

        Idempotent, so a redelivery of the same dead letter (recognised as ``record_id``, the
        record stored the first time) completes a link its first delivery did not finish.
        """
        if not record.replay_of:
            return
        await self.archive.mark_replay_failed(record.replay_of, record_id)
        if record.replay_id and "." in record.replay_id:
            job_id = record.replay_id.split(".", 1)[0]
            await self.archive.record_job_failure(job_id, record_id)

    async def update_gauges(self, top_groups: int) -> None:
        self.metrics.archive_size.set(await self.archive.size())
        oldest = await self.archive.oldest_id()
        age = (datetime.now(UTC) - id_time(oldest)).total_seconds() if oldest else 0.0
        self.metrics.oldest_age.set(max(0.0, age))
        self.metrics.group_size.clear()
        if top_groups:
            groups = await self.archive.groups(limit=200)
            largest: list[dict[str, Any]] = sorted(groups, key=lambda g: -int(g["count"]))
            for group in largest[:top_groups]:
                self.metrics.group_size.labels(
                    group["fingerprint"], group["source_queue"] or "", group["event_type"] or ""
                ).set(group["count"])
