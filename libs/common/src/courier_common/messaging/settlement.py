"""What becomes of one delivery: the decision a handler returns, as a value.

A handler never acks. It returns one of these and the delivery loop applies it, in one
place (:meth:`courier_common.messaging.loop.DeliveryLoop.settle`):

============  ====================================================================  ==========
settlement    what the loop does                                                    outcome
============  ====================================================================  ==========
``Ack``       ack                                                                   acked
``Ack(duplicate=True)``  ack (every effect had already happened)                    duplicate
``Retry``     publish to the queue's retry tier for ``delay``, confirmed, then ack  retried
``DeadLetter``  publish to ``courier.dlx`` with the diagnosis, confirmed, then ack  dead_lettered
``Requeue``   return it to the queue (``basic.nack`` with requeue)                  requeued
``Reject``    ``basic.reject`` without requeue: the queue's own dead-lettering      dead_lettered
============  ====================================================================  ==========

A publish that fails turns ``Retry`` into ``DeadLetter`` and ``DeadLetter`` into ``Reject``,
so a message is never lost and never spins in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from courier_common.messaging.deadletter import Diagnosis


@dataclass(frozen=True, slots=True)
class Ack:
    """Done. ``duplicate``: nothing had to be done, it had all happened before."""

    duplicate: bool = False

    @property
    def outcome(self) -> str:
        return "duplicate" if self.duplicate else "acked"


@dataclass(frozen=True, slots=True)
class Retry:
    """Try again after ``delay`` (a retry tier of the queue).

    ``reason`` and ``exception`` (``module.QualName``) are what failed; they become the
    diagnosis if the retry cannot be published and the message is dead-lettered instead.
    """

    delay: timedelta
    reason: str
    exception: str | None = None

    outcome = "retried"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """It will not work: dead-letter it with ``diagnosis``."""

    diagnosis: Diagnosis

    outcome = "dead_lettered"


@dataclass(frozen=True, slots=True)
class Requeue:
    """Give it back to the broker for another consumer (the archiver does, stopping)."""

    reason: str

    outcome = "requeued"


@dataclass(frozen=True, slots=True)
class Reject:
    """Reject without requeue: the broker dead-letters it with only ``x-death``."""

    reason: str

    outcome = "dead_lettered"


Settlement = Ack | Retry | DeadLetter | Requeue | Reject
