"""Courier's AMQP header names (docs/asyncapi.yaml lists them per message), defined once.

They are written and read in one module, :mod:`courier_common.messaging.deadletter`: the
diagnosis of a dead letter, the headers of a retry hop and of a replay.
"""

from __future__ import annotations

from typing import Final

#: 1 on the first delivery; the runner increments it on every retry hop.
ATTEMPT: Final = "x-courier-attempt"

# The diagnosis of a dead letter.
FAILURE_REASON: Final = "x-courier-failure-reason"
FAILURE_KIND: Final = "x-courier-failure-kind"
EXCEPTION: Final = "x-courier-exception"
ORIGINAL_EXCHANGE: Final = "x-courier-original-exchange"
ORIGINAL_ROUTING_KEY: Final = "x-courier-original-routing-key"
ORIGINAL_QUEUE: Final = "x-courier-original-queue"
FIRST_FAILED_AT: Final = "x-courier-first-failed-at"
DIAGNOSIS: Final = frozenset(
    {
        FAILURE_REASON,
        FAILURE_KIND,
        EXCEPTION,
        ORIGINAL_EXCHANGE,
        ORIGINAL_ROUTING_KEY,
        ORIGINAL_QUEUE,
        FIRST_FAILED_AT,
    }
)

# A replayed dead letter: which record it came from, and which replay this is.
REPLAY_OF: Final = "x-courier-replay-of"
REPLAY_ID: Final = "x-courier-replay-id"

#: What the broker adds when it dead-letters a message.
BROKER_DEATH: Final = frozenset(
    {
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        "x-delivery-count",
    }
)
