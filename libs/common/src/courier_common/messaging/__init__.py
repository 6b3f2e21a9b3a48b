"""AMQP for Courier: topology, connection, confirmed publishing, the consumer runner."""

from courier_common.messaging import _pamqp_compat  # noqa: F401  # tolerant header names
from courier_common.messaging.connection import AmqpConnection
from courier_common.messaging.consumer import ConsumerRunner, Delivery, Router, current_delivery
from courier_common.messaging.envelope import (
    EnvelopeError,
    Event,
    EventCatalog,
    EventData,
    new_event,
    new_event_id,
)
from courier_common.messaging.idempotency import IdempotencyStore
from courier_common.messaging.publisher import (
    OutgoingMessage,
    Publisher,
    PublishError,
    PublishNackedError,
    UnroutableError,
)
from courier_common.messaging.retry import PermanentError, RetryableError, RetryPolicy
from courier_common.messaging.topology import (
    NOTIFICATION_USER_EVENTS,
    Topology,
    TopologyMismatchError,
    WorkQueue,
    declare_topology,
)

__all__ = [
    "NOTIFICATION_USER_EVENTS",
    "AmqpConnection",
    "ConsumerRunner",
    "Delivery",
    "EnvelopeError",
    "Event",
    "EventCatalog",
    "EventData",
    "IdempotencyStore",
    "OutgoingMessage",
    "PermanentError",
    "PublishError",
    "PublishNackedError",
    "Publisher",
    "RetryPolicy",
    "RetryableError",
    "Router",
    "Topology",
    "TopologyMismatchError",
    "UnroutableError",
    "WorkQueue",
    "current_delivery",
    "declare_topology",
    "new_event",
    "new_event_id",
]
