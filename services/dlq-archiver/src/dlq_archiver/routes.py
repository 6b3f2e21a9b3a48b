"""dlq-archiver's routes: the dead letters it archives, and its erasure queue.

``courier.dead-letters`` is the platform's (courier_common declares it); the erasure queue is
this service's own: ``dlq-archiver.user-events`` takes ``user.deleted`` from ``courier.events``
so that a deleted user's dead letters lose their personal data.
"""

from __future__ import annotations

from typing import Final

from courier_common.messaging import WorkQueue
from courier_common.settings import ConsumerSettings

ERASURE_QUEUE: Final = "dlq-archiver.user-events"
ERASURE_BINDINGS: Final = ("user.deleted",)


def erasure_queue(settings: ConsumerSettings) -> WorkQueue:
    """The erasure work queue, configured from ``settings``; never capped (an erasure must
    not be refused)."""
    return settings.work_queue(ERASURE_QUEUE, ERASURE_BINDINGS, capped=False)
