"""Consume ``courier.dead-letters`` and archive every message, whatever it contains.

This consumer cannot use the envelope-decoding runner: a dead letter may be any bytes, and
dead-lettering a dead letter would loop. It stores, then acks. When Redis is unavailable it
keeps the message (unacked) and retries the store with backoff: a dead letter leaves the
queue only once it is in the archive. On shutdown it stops retrying and leaves such a message
unacked, so the broker delivers it again (to this archiver's successor).

Each delivery is handled in a ``process courier.dead-letters`` span whose parent is the
dead-letter publish (from the message's ``traceparent``), so the archive closes the trace of
the message that died.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any, Final

import redis.exceptions
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from opentelemetry.trace import Span, Tracer
from prometheus_client import CollectorRegistry, Counter, Gauge

from courier_common.failpoints import failpoint
from courier_common.logging import get_logger
from courier_common.messaging import AmqpConnection, new_event_id
from courier_common.messaging.topology import declare_queue
from courier_common.tracing import get_tracer, process_span
from dlq_archiver.records import DeadLetterRecord, from_message
from dlq_archiver.shutdown import cancel_and_wait, pause
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
            "Replays by outcome: published, refused (erased or route unknown), failed_again.",
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
    """The archiving loop on its own channel."""

    def __init__(
        self,
        *,
        connection: AmqpConnection,
        archive: Archive,
        metrics: ArchiverMetrics,
        queue: str,
        prefetch: int = 50,
        tracer: Tracer | None = None,
    ) -> None:
        self.connection = connection
        self.archive = archive
        self.metrics = metrics
        self.queue_name = queue
        self.prefetch = prefetch
        self.tracer = tracer or get_tracer("dlq_archiver")
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        channel = await self.connection.channel(prefetch=self.prefetch)
        # Through declare_queue: the queue may have been created with an initial group size
        # (the topology's), which a plain re-declaration without it would fail on.
        self._queue = await declare_queue(channel, self.queue_name, {"x-queue-type": "quorum"})
        self._tag = await self._queue.consume(self._on_message)
        log.info("archiver_started", queue=self.queue_name)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(self._archive(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _archive(self, message: AbstractIncomingMessage) -> None:
        with process_span(
            self.tracer,
            queue=self.queue_name,
            headers=message.headers,
            message_id=message.message_id,
            routing_key=message.routing_key,
            exchange=message.exchange,
            body_size=len(message.body),
        ) as span:
            await self._store(message, span)

    async def _store(self, message: AbstractIncomingMessage, span: Span) -> None:
        now = datetime.now(UTC)
        record = from_message(message, record_id=str(new_event_id()), now=now)
        delay = 0.2
        while True:
            try:
                existing = await self.archive.insert(record)
                break
            except redis.exceptions.RedisError as exc:
                if self._stopping.is_set():
                    span.set_attribute(OUTCOME_ATTRIBUTE, "left_for_redelivery")
                    log.warning(
                        "dead_letter_left_for_redelivery",
                        message_id=record.message_id,
                        error=repr(exc),
                    )
                    return  # unacked: the broker delivers it again once the channel closes
                log.warning("archive_store_failed", error=repr(exc), retry_in_s=delay)
                await pause(self._stopping, delay)
                delay = min(delay * 2, 5.0)
        if existing is not None:
            span.set_attributes({RECORD_ID_ATTRIBUTE: existing, OUTCOME_ATTRIBUTE: "duplicate"})
            self.metrics.duplicates.inc()
            await self._link_replay(record, existing)  # the first delivery may have stopped short
            log.info("dead_letter_duplicate", record_id=existing, message_id=record.message_id)
        else:
            span.set_attributes({RECORD_ID_ATTRIBUTE: record.id, OUTCOME_ATTRIBUTE: "archived"})
            self.metrics.archived.labels(record.source_queue, record.reason_class).inc()
            await self._link_replay(record, record.id)
            if record.replay_of:
                self.metrics.replays.labels("failed_again").inc()
            log.info(
                "dead_letter_archived",
                record_id=record.id,
                message_id=record.message_id,
                source_queue=record.source_queue,
                event_type=record.event_type,
                reason_class=record.reason_class,
                reason=record.reason,
            )
        failpoint("archiver.before_ack")
        try:
            await message.ack()
        except Exception as exc:  # the channel died: redelivery is deduplicated
            log.warning("archive_ack_failed", error=repr(exc))

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

    async def stop(self, timeout: float = 10.0) -> bool:
        """Stop taking dead letters and let the ones in hand finish, within ``timeout``.

        True when every one finished. Whatever did not is cancelled unacked: the broker
        delivers it again, and the archive recognises what it already stored.
        """
        self._stopping.set()
        if self._queue is not None and self._tag is not None:
            try:
                await self._queue.cancel(self._tag)
            except Exception as exc:
                log.warning("archiver_cancel_failed", error=repr(exc))
            self._tag = None
        drained = True
        if self._tasks:
            log.info("archiver_draining", in_flight=len(self._tasks))
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            if pending:
                drained = False
                await cancel_and_wait(pending)
        log.info("archiver_stopped", queue=self.queue_name, drained=drained)
        return drained

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
