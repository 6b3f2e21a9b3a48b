"""notification-service's route: the work queue it consumes, defined beside its handlers.

``notification.user-events`` takes every user event from ``courier.events`` (``user.*``) and
retries through its own tiers (``notification.user-events.retry.<delay>``), with the retry
policy and limits of this service's settings. A replayed dead letter comes back to it through
the default exchange. Tests, the bench and the dashboards import these names.
"""

from __future__ import annotations

from typing import Final

from courier_common.messaging import WorkQueue
from courier_common.settings import ConsumerSettings

USER_EVENTS_QUEUE: Final = "notification.user-events"
USER_EVENTS_BINDINGS: Final = ("user.*",)


def user_events_queue(settings: ConsumerSettings) -> WorkQueue:
    """The work queue the notifier consumes, configured from ``settings``."""
    return settings.work_queue(USER_EVENTS_QUEUE, USER_EVENTS_BINDINGS)
