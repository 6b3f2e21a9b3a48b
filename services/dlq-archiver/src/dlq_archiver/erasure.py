"""Erasure: when a user is deleted, their dead letters keep no personal data.

The record stays (operators still see that something failed, and why), but the event's
personal fields are replaced and the record can no longer be replayed. Behind Sentinel the
redacted records are confirmed by the replicas before the event is acknowledged: a failover
must not bring the personal data back.
"""

from __future__ import annotations

import base64
import json

from courier_common.events import UserDeleted
from courier_common.logging import get_logger
from courier_common.messaging import AmqpConnection, ConsumerRunner, Event, RetryableError, Router
from courier_common.metrics import MessagingMetrics
from courier_common.pii import scrub_text
from courier_common.settings import ConsumerSettings
from dlq_archiver.records import DeadLetterRecord, mask
from dlq_archiver.routes import erasure_queue
from dlq_archiver.store import Archive

log = get_logger(__name__)

ERASED = "[erased]"
PERSONAL_FIELDS = ("email", "display_name", "phone", "push_token")


def _erase(record: DeadLetterRecord) -> bool:
    """Replace the personal fields of *record*; False when it was erased already."""
    if record.erased:
        return False
    record.body_b64 = base64.b64encode(_redact_body(record.body)).decode()
    record.reason = scrub_text(record.reason)
    record.headers = mask(record.headers)
    record.erased = True
    return True


def _redact_body(body: bytes) -> bytes:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return scrub_text(body.decode("utf-8", errors="replace")).encode()
    data = document.get("data") if isinstance(document, dict) else None
    if isinstance(data, dict):
        for name in PERSONAL_FIELDS:
            if data.get(name) is not None:
                data[name] = ERASED
    return json.dumps(document, separators=(",", ":")).encode()


class Eraser:
    def __init__(self, archive: Archive) -> None:
        self.archive = archive

    def router(self) -> Router:
        router = Router()
        router.add(UserDeleted, self.on_user_deleted)
        return router

    def runner(
        self, connection: AmqpConnection, settings: ConsumerSettings, metrics: MessagingMetrics
    ) -> ConsumerRunner:
        """The consumer of the erasure queue (`dlq_archiver.routes.erasure_queue`)."""
        return ConsumerRunner(
            connection=connection,
            queue=erasure_queue(settings),
            router=self.router(),
            metrics=metrics,
            consumer_name="dlq-archiver",
            prefetch=10,
        )

    async def on_user_deleted(self, event: Event[UserDeleted]) -> None:
        user_id = str(event.data.user_id)
        ids = await self.archive.user_record_ids(user_id)
        for record_id in ids:
            await self.archive.update(record_id, _erase)
        if ids and self.archive.durability.enabled:
            records = await self.archive.confirmed_records(ids)
            if not all(record.erased for record in records):
                # The primary changed under us and lost a redaction: do it again.
                raise RetryableError("an erased dead letter is unredacted on the new primary")
        if ids:
            await self.archive.audit("erase", what={"user_id": user_id}, count=len(ids))
        log.info("user_dead_letters_erased", user_id=user_id, count=len(ids))
