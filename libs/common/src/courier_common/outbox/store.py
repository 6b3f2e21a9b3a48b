"""The writer side of the outbox: a service's own Lua script queues the event of its change.

A change and its event are written by ONE script: Redis runs a script atomically, so the change
happened with its event queued, or did not happen at all, and the broker is not on the path
(the relay, :mod:`courier_common.outbox.relay`, publishes the entries later). The script's body
is the service's business logic; :meth:`Outbox.script` puts the Lua function ``emit_outbox()``
in front of it, and :meth:`Outbox.with_event` appends what that function reads to the body's
own KEYS and ARGV: the stream as the last key, the entry's fields as the last five arguments.
The body's own numbering is therefore unchanged by the event.

Run the script as any other (``Durability.script`` when the answer depends on replicas).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from courier_common.messaging import EventData, new_event
from courier_common.messaging.tracing import inject_context

#: Appends one entry to the stream ``KEYS[#KEYS]`` from ``ARGV[#ARGV - 4 .. #ARGV]``, in the
#: order of :class:`EntryFields`. A script calls it at most once per run, on the branches that
#: change something.
EMIT_OUTBOX = """
local function emit_outbox()
  local a = #ARGV - 4
  redis.call('XADD', KEYS[#KEYS], '*', 'event', ARGV[a], 'routing_key', ARGV[a + 1],
             'event_id', ARGV[a + 2], 'traceparent', ARGV[a + 3], 'tracestate', ARGV[a + 4])
end
"""


def stream_key(prefix: str, name: str = "outbox") -> str:
    """The outbox stream under a deployment's Redis prefix.

    The relay's consumer group is per stream, so two services that publish through an outbox
    under one prefix give theirs different names.
    """
    return f"{prefix}{name}"


@dataclass(frozen=True, slots=True)
class EntryFields:
    """One outbox entry: the stream fields ``emit_outbox()`` writes and the relay publishes."""

    #: The CloudEvents envelope as JSON: the message body.
    event: str
    #: The event type: the message's routing key and type.
    routing_key: str
    #: The event id: the message id consumers deduplicate by.
    event_id: str
    #: The W3C trace context of the change, so the publish continues its trace ('' for none).
    traceparent: str
    tracestate: str

    @classmethod
    def pack(cls, data: EventData, *, source: str) -> EntryFields:
        """A new event (fresh UUIDv7 id) for *data*, with the current trace context."""
        event = new_event(data, source=source)
        carrier: dict[str, Any] = {}
        inject_context(carrier)
        return cls(
            event=event.encode().decode(),
            routing_key=event.type,
            event_id=str(event.id),
            traceparent=str(carrier.get("traceparent", "")),
            tracestate=str(carrier.get("tracestate", "")),
        )

    def argv(self) -> tuple[str, ...]:
        """The values in the order ``emit_outbox()`` reads them."""
        return astuple(self)


class Outbox:
    """One service's outbox stream, as its scripts write it."""

    def __init__(self, redis: Redis, *, stream: str, source: str) -> None:
        self.redis = redis
        self.stream = stream
        #: The CloudEvents ``source`` of every event queued here.
        self.source = source

    def script(self, body: str) -> AsyncScript:
        """Register *body* (Lua that calls ``emit_outbox()``) with the emit function before it."""
        if "emit_outbox()" not in body:
            raise ValueError("an outbox script must call emit_outbox()")
        return self.redis.register_script(EMIT_OUTBOX + body)

    def with_event(
        self, data: EventData, *, keys: Sequence[Any], args: Sequence[Any]
    ) -> tuple[list[Any], list[Any]]:
        """The body's *keys* and *args*, followed by the stream and the entry for *data*."""
        return [*keys, self.stream], [*args, *EntryFields.pack(data, source=self.source).argv()]
