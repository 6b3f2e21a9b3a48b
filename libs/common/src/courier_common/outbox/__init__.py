"""The transactional outbox: events queued in Redis with the change they describe, then relayed.

A service writes its change and the event in one Lua script (``store.py``: `Outbox`, the
``emit_outbox()`` function its script calls, the entry's fields); the relay (``relay.py``:
`OutboxRelay`, a task in every replica) publishes the entries to RabbitMQ with confirms and
deletes each only after its confirm. The broker is never on the write path.
"""

from courier_common.outbox.relay import GROUP, Entry, OutboxMetrics, OutboxRelay
from courier_common.outbox.store import EMIT_OUTBOX, EntryFields, Outbox, stream_key

__all__ = [
    "EMIT_OUTBOX",
    "GROUP",
    "Entry",
    "EntryFields",
    "Outbox",
    "OutboxMetrics",
    "OutboxRelay",
    "stream_key",
]
