"""Replay: put a dead letter back in the queue that failed it, one at a time or in a bulk job.

A replay goes through the default exchange straight to the dead letter's source queue — the
consumer that gave up on it — and to no other queue: republishing to the original exchange and
routing key would hand it again to every queue bound to that key (another service's consumer of
the same event, say). It keeps its body and ``message_id`` (so the consumer's idempotency
recognises what was already done: replaying twice sends once), its original exchange and
routing key in ``x-courier-original-*`` (the handler sees the route it was first published on),
loses its diagnosis and attempt headers (a fresh retry budget), and carries
``x-courier-replay-of`` and ``x-courier-replay-id`` so a replay that fails again comes back
linked to its record. The headers are courier_common's (``replay_headers``). A dead letter
whose source queue is unknown cannot be replayed.

A bulk job is paced (``rate_per_second``) and goes in batches: the canary (the first N), then
the ``ramp`` (say 1, 2, 5, 20), then the rest. After each batch but the last it watches for
``canary_wait_seconds`` and goes on only if the replays so far did not die again past
``max_failure_rate``; it also halts when that share is passed mid-batch. An operator can cancel
it (a flag in Redis, so any replica may take the request): it stops between two replays. What
a halted or cancelled job did not replay stays in the archive, untouched. When the archiver
shuts down, a job stops between two replays and is marked ``interrupted``. The job keeps a
watermark, the newest record of its filter when it started, so its view can say how many new
dead letters joined the filter while it ran (``new_failures``): the cause may not be fixed.

Tracing: a replay belongs to the operator's trace, not the dead letter's. Each one is a
``replay dead letter`` span — a child of the API request, or of the ``bulk replay`` span of its
job — with a `Link` to the trace context the dead letter was stored with; its publish is a child
of that span, and the replayed message carries the replay's context, not the original one.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from opentelemetry.trace import Tracer

from courier_common.logging import get_logger
from courier_common.messaging import (
    DEAD_LETTER_QUEUE,
    DEFAULT_EXCHANGE,
    AmqpConnection,
    Diagnosis,
    OutgoingMessage,
    Publisher,
    PublishError,
    UnroutableError,
    new_event_id,
    replay_headers,
)
from courier_common.messaging.tracing import link_from_headers
from courier_common.metrics import MessagingMetrics
from courier_common.tasks import cancel_and_wait, pause
from courier_common.tracing import get_tracer, operation_span
from dlq_archiver.archiving import RECORD_ID_ATTRIBUTE, ArchiverMetrics
from dlq_archiver.records import DeadLetterRecord
from dlq_archiver.store import Archive, Filter

log = get_logger(__name__)

# Span attributes of a replay and its job; the replay's link to the dead letter's trace says
# what it is with LINK_RELATION_ATTRIBUTE = REPLAY_OF.
REPLAY_ID_ATTRIBUTE: Final = "courier.replay.id"
JOB_ID_ATTRIBUTE: Final = "courier.replay.job_id"
JOB_TOTAL_ATTRIBUTE: Final = "courier.replay.job_total"
LINK_RELATION_ATTRIBUTE: Final = "courier.link.relation"
REPLAY_OF: Final = "replay_of"


class ReplayRefused(Exception):
    """This record cannot be replayed (erased, or the queue it failed in is unknown)."""


@dataclass(frozen=True, slots=True)
class BulkReplayRequest:
    filter: Filter
    rate_per_second: float
    canary: int
    canary_wait_seconds: float
    max_failure_rate: float
    min_sample: int = 10
    limit: int = 10_000
    ramp: tuple[int, ...] = ()

    def batches(self, total: int) -> list[int]:
        """Batch sizes for ``total`` records: the canary, the ramp, then the rest."""
        sizes: list[int] = []
        left = total
        for size in ([self.canary] if self.canary else []) + list(self.ramp):
            if left == 0:
                break
            sizes.append(min(size, left))
            left -= sizes[-1]
        return [*sizes, left] if left else sizes


class Replayer:
    """Publishes replays and runs bulk replay jobs in this process."""

    def __init__(
        self,
        *,
        archive: Archive,
        connection: AmqpConnection,
        metrics: ArchiverMetrics,
        messaging_metrics: MessagingMetrics,
        tracer: Tracer | None = None,
    ) -> None:
        self.archive = archive
        self.connection = connection
        self.publisher: Publisher | None = None
        self.messaging_metrics = messaging_metrics
        self.metrics = metrics
        self.tracer = tracer or get_tracer("dlq_archiver")
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()

    @property
    def ready(self) -> bool:
        """Whether replays can be published: :meth:`start` has its channel."""
        return self.publisher is not None

    async def start(self) -> None:
        """Open the publishing channel; a job the last process left running is interrupted."""
        self.publisher = Publisher(await self.connection.channel(), metrics=self.messaging_metrics)
        for job_id in await self.archive.running_jobs():  # the process died mid-job
            await self.archive.update_job(job_id, status="interrupted")

    async def replay(self, record: DeadLetterRecord, *, job_id: str | None = None) -> str:
        """Republish one record to the queue it failed in; the replay id.

        Runs in the caller's trace (the API request's, or the bulk job's) and links to the
        dead letter's own trace.
        """
        link = link_from_headers(record.headers, {LINK_RELATION_ATTRIBUTE: REPLAY_OF})
        attributes: dict[str, str] = {RECORD_ID_ATTRIBUTE: record.id}
        if job_id:
            attributes[JOB_ID_ATTRIBUTE] = job_id
        with operation_span(
            self.tracer,
            "replay dead letter",
            attributes=attributes,
            links=[link] if link else [],
            error_type=lambda exc: "refused" if isinstance(exc, ReplayRefused) else None,
        ) as span:
            replay_id = await self._replay(record, job_id)
            span.set_attribute(REPLAY_ID_ATTRIBUTE, replay_id)
            return replay_id

    async def _replay(self, record: DeadLetterRecord, job_id: str | None) -> str:
        diagnosis = record.diagnosis()
        target = diagnosis.source_queue
        if record.erased:
            self.metrics.replays.labels("refused").inc()
            raise ReplayRefused("the record was erased with its user and cannot be replayed")
        if target is None or target == DEAD_LETTER_QUEUE:
            self.metrics.replays.labels("refused").inc()
            raise ReplayRefused(
                "the queue this dead letter failed in is unknown (it carries neither "
                "x-courier-original-queue nor an x-death queue), so there is no consumer to "
                "give it back to"
            )
        replay_id = f"{job_id}.{new_event_id()}" if job_id else f"single.{new_event_id()}"
        try:
            await self._publish(record, target, replay_id, diagnosis)
        except UnroutableError:
            self.metrics.replays.labels("refused").inc()
            raise ReplayRefused(
                f"queue '{target}' does not exist on this vhost: its consumer has not declared it "
                "yet, or it was deleted; the dead letter stays in the archive"
            ) from None
        await self.archive.mark_replayed(record.id, replay_id, job_id)
        self.metrics.replays.labels("published").inc()
        log.info(
            "dead_letter_replayed",
            record_id=record.id,
            replay_id=replay_id,
            job_id=job_id,
            queue=target,
        )
        return replay_id

    async def _publish(
        self, record: DeadLetterRecord, target: str, replay_id: str, diagnosis: Diagnosis
    ) -> None:
        if self.publisher is None:
            raise RuntimeError("the replayer is not started")
        await self.publisher.publish(
            OutgoingMessage(
                exchange=DEFAULT_EXCHANGE,
                routing_key=target,
                body=record.body,
                message_id=record.message_id,
                type=record.properties.get("type") or record.event_type,
                content_type=record.content_type,
                headers=replay_headers(
                    record.amqp_headers(),
                    replay_of=record.id,
                    replay_id=replay_id,
                    diagnosis=diagnosis,
                ),
            )
        )

    async def start_job(self, request: BulkReplayRequest) -> str:
        ids = await self.archive.ids_matching(request.filter, max_count=request.limit)
        batches = request.batches(len(ids))
        fingerprint = request.filter.fingerprint
        group = await self.archive.group(fingerprint) if fingerprint else None
        job_id = await self.archive.create_job(
            {
                "status": "running",
                "filter": request.filter.as_dict(),
                "total": len(ids),
                "replayed": 0,
                "refused": 0,
                "canary": min(request.canary, len(ids)),
                "ramp": list(request.ramp),
                "batches": batches,
                "batch": 1 if batches else 0,
                "phase": "replaying",
                "rate_per_second": request.rate_per_second,
                "canary_wait_seconds": request.canary_wait_seconds,
                "max_failure_rate": request.max_failure_rate,
                "created_at": datetime.now(UTC).isoformat(),
                "watermark": await self.archive.newest_id(request.filter),
                # The group as the operator saw it; new_failures counts from the watermark.
                "group_at_start": (
                    {"count": group["count"], "last_seen": group["last_seen"]} if group else None
                ),
                "cancel_requested": False,
                "reason": None,
            },
            ids,
        )
        await self.archive.audit(
            "bulk_replay_started",
            what={"job_id": job_id, **request.filter.as_dict()},
            count=len(ids),
        )
        log.info("bulk_replay_started", job_id=job_id, total=len(ids), batches=batches)
        # The task copies the request's context: the job's span is a child of the request's.
        task = asyncio.create_task(
            self._run_traced(job_id, ids, batches, request), name=f"replay-{job_id}"
        )
        self._jobs[job_id] = task
        task.add_done_callback(lambda _: self._jobs.pop(job_id, None))
        return job_id

    async def _run_traced(
        self, job_id: str, ids: list[str], batches: list[int], request: BulkReplayRequest
    ) -> None:
        with operation_span(
            self.tracer,
            "bulk replay",
            attributes={JOB_ID_ATTRIBUTE: job_id, JOB_TOTAL_ATTRIBUTE: len(ids)},
        ):
            await _JobRun(self, self._stopping, job_id, batches, request).run(ids)

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop every job between two replays (marked interrupted), within ``timeout``.

        A job still busy after that (a publish waiting for its confirm) is cancelled; it is
        marked interrupted all the same.
        """
        self._stopping.set()
        jobs = list(self._jobs.values())
        if not jobs:
            return
        _, pending = await asyncio.wait(jobs, timeout=timeout)
        if pending:
            await cancel_and_wait(pending)


class _Stop(Exception):
    """The job ends here; ``outcome`` says how (halted, cancelled, interrupted)."""

    def __init__(self, outcome: str, reason: str | None = None) -> None:
        super().__init__(outcome)
        self.outcome = outcome
        self.reason = reason


class _JobRun:
    """One bulk job, batch after batch; every way it can end is a `_Stop`, written once."""

    #: How often a wait (pacing, a batch's watch) looks for a cancel request, in seconds.
    POLL: Final = 0.2

    def __init__(
        self,
        replayer: Replayer,
        stopping: asyncio.Event,
        job_id: str,
        batches: list[int],
        request: BulkReplayRequest,
    ) -> None:
        self.replayer = replayer
        self.archive = replayer.archive
        self.stopping = stopping
        self.job_id = job_id
        self.batches = batches
        self.request = request
        self.replayed = 0
        self.refused = 0

    async def run(self, ids: list[str]) -> None:
        # Mid-batch checks start after the first batch when it is a canary or a ramp step.
        checked_from = self.batches[0] if self.request.canary or self.request.ramp else 0
        try:
            start = 0
            for number, size in enumerate(self.batches, start=1):
                await self.archive.update_job(self.job_id, batch=number, phase="replaying")
                await self._replay_batch(ids[start : start + size], start, checked_from)
                start += size
                if number < len(self.batches):
                    await self._watch(number)
            await self._finish("completed", "bulk_replay_completed")
            log.info(
                "bulk_replay_completed",
                job_id=self.job_id,
                replayed=self.replayed,
                refused=self.refused,
            )
        except _Stop as stop:
            await self._stopped(stop)
        except PublishError as exc:
            await self._stopped(_Stop("halted", f"publishing failed: {exc}"))
        except asyncio.CancelledError:
            await self._stopped(_Stop("interrupted"))
            raise

    async def _replay_batch(self, ids: list[str], first_index: int, checked_from: int) -> None:
        interval = 1.0 / self.request.rate_per_second
        next_at = time.monotonic()
        for index, record_id in enumerate(ids, start=first_index):
            await self._wait(next_at - time.monotonic())
            next_at = max(next_at + interval, time.monotonic())
            record = await self.archive.get(record_id)
            if record is None:  # purged meanwhile
                continue
            try:
                await self.replayer.replay(record, job_id=self.job_id)
                self.replayed += 1
            except ReplayRefused:
                self.refused += 1
            await self._progress()  # live progress: one HSET beside the replay's writes
            if index >= checked_from and self.replayed >= self.request.min_sample:
                failed = await self.archive.job_failed_again(self.job_id)
                if failed > self.request.max_failure_rate * self.replayed:
                    raise _Stop("halted", f"{failed} of {self.replayed} replays failed again")

    async def _watch(self, number: int) -> None:
        """Wait for batch ``number``'s verdict: go on only if the replays so far stayed clean.

        Only failures can be observed (a replay that worked sends no word back), so the watch
        ends either when ``canary_wait_seconds`` pass or as soon as the failures seen are past
        ``max_failure_rate``: more failures could only confirm that verdict, never reverse it.
        Replays still on their way to the dead-letter queue then are not lost: they are linked
        to the job as they arrive, and its ``failed_again`` counts them.
        """
        await self.archive.update_job(self.job_id, phase="watching")
        deadline = time.monotonic() + self.request.canary_wait_seconds
        limit = self.request.max_failure_rate * self.replayed
        failed = await self.archive.job_failed_again(self.job_id)
        while failed <= limit and time.monotonic() < deadline:
            await self._wait(min(self.POLL, deadline - time.monotonic()))
            failed = await self.archive.job_failed_again(self.job_id)
        if failed > limit:
            what = "canary replays" if number == 1 and self.request.canary else "replays"
            raise _Stop(
                "halted", f"{failed} of {self.replayed} {what} failed again (batch {number})"
            )

    async def _wait(self, seconds: float) -> None:
        """Pause up to ``seconds``; a stop of the archiver or a cancel request ends the job."""
        stopping = self.stopping
        deadline = time.monotonic() + seconds
        while True:
            await pause(stopping, min(self.POLL, deadline - time.monotonic()))
            if stopping.is_set():  # the archiver is stopping: the rest stays untouched
                raise _Stop("interrupted")
            if await self.archive.cancel_requested(self.job_id):
                raise _Stop("cancelled", "cancelled by an operator")
            if time.monotonic() >= deadline:
                return

    async def _progress(self) -> None:
        await self.archive.update_job(self.job_id, replayed=self.replayed, refused=self.refused)

    async def _finish(self, status: str, action: str, reason: str | None = None) -> None:
        fields = {"reason": reason} if reason else {}
        await self.archive.update_job(
            self.job_id,
            status=status,
            replayed=self.replayed,
            refused=self.refused,
            finished_at=datetime.now(UTC).isoformat(),
            **fields,
        )
        await self.archive.audit(
            action, what={"job_id": self.job_id, **fields}, count=self.replayed
        )

    async def _stopped(self, stop: _Stop) -> None:
        if stop.outcome == "interrupted":  # not audited: the operator did nothing
            await self.archive.update_job(
                self.job_id, status="interrupted", replayed=self.replayed, refused=self.refused
            )
            log.warning("bulk_replay_interrupted", job_id=self.job_id, replayed=self.replayed)
            return
        await self._finish(stop.outcome, f"bulk_replay_{stop.outcome}", stop.reason)
        log.warning(
            f"bulk_replay_{stop.outcome}",
            job_id=self.job_id,
            reason=stop.reason,
            replayed=self.replayed,
        )
