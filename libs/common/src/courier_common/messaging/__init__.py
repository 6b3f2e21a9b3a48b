"""AMQP for Courier: topology, connection, confirmed publishing, the delivery layer.

Where to look:

* what becomes of a delivery (ack, retry, dead-letter, requeue): ``settlement.py`` names the
  decisions, ``loop.py`` (``DeliveryLoop.settle``) applies them, ``consumer.py``
  (``ConsumerRunner.handle``) decides them for typed events;
* the retry delay: ``retry.py`` (``RetryPolicy.next_delay``), per work queue;
* a dead letter's reason and the headers of a retry hop and a replay: ``deadletter.py``;
* routes: ``topology.py`` has the platform objects and the ``WorkQueue`` type; each service
  defines its own work queues beside its handlers.
* trace context in message headers and the publish and process spans: ``tracing.py``.
"""

from courier_common.messaging import _pamqp_compat  # noqa: F401  # tolerant header names
from courier_common.messaging.connection import AmqpConnection
from courier_common.messaging.consumer import ConsumerRunner, Router
from courier_common.messaging.deadletter import Death, Diagnosis, FailureKind, replay_headers
from courier_common.messaging.delivery import Delivery, current_delivery, diagnose
from courier_common.messaging.envelope import (
    EnvelopeError,
    Event,
    EventCatalog,
    EventData,
    new_event,
    new_event_id,
)
from courier_common.messaging.idempotency import IdempotencyStore
from courier_common.messaging.loop import DeliveryHandler, DeliveryLoop
from courier_common.messaging.publisher import (
    OutgoingMessage,
    Publisher,
    PublishError,
    PublishNackedError,
    UnroutableError,
)
from courier_common.messaging.retry import PermanentError, RetryableError, RetryPolicy
from courier_common.messaging.settlement import (
    Ack,
    DeadLetter,
    Reject,
    Requeue,
    Retry,
    Settlement,
)
from courier_common.messaging.topology import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DEAD_LETTERS,
    DEFAULT_EXCHANGE,
    EVENTS_EXCHANGE,
    DeadLetterQueue,
    Topology,
    TopologyMismatchError,
    WorkQueue,
    declare_topology,
)

__all__ = [
    "DEAD_LETTERS",
    "DEAD_LETTER_EXCHANGE",
    "DEAD_LETTER_QUEUE",
    "DEFAULT_EXCHANGE",
    "EVENTS_EXCHANGE",
    "Ack",
    "AmqpConnection",
    "ConsumerRunner",
    "DeadLetter",
    "DeadLetterQueue",
    "Death",
    "Delivery",
    "DeliveryHandler",
    "DeliveryLoop",
    "Diagnosis",
    "EnvelopeError",
    "Event",
    "EventCatalog",
    "EventData",
    "FailureKind",
    "IdempotencyStore",
    "OutgoingMessage",
    "PermanentError",
    "PublishError",
    "PublishNackedError",
    "Publisher",
    "Reject",
    "Requeue",
    "Retry",
    "RetryPolicy",
    "RetryableError",
    "Router",
    "Settlement",
    "Topology",
    "TopologyMismatchError",
    "UnroutableError",
    "WorkQueue",
    "current_delivery",
    "declare_topology",
    "diagnose",
    "new_event",
    "new_event_id",
    "replay_headers",
]
