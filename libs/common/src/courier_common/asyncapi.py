"""The event contract as an AsyncAPI 3.0 document, generated from the code that implements it.

Everything in the document is read from the objects the services run with, so it cannot say
something the code does not do:

* each message is an event type and version of the catalog (:class:`EventData` subclasses),
  its payload the CloudEvents envelope Courier publishes (``Event[...]``), its schema the
  pydantic model's own (serialization mode: what is on the wire);
* the channels are the platform topology — the topic exchange ``courier.events``, the
  dead-letter exchange ``courier.dlx`` and its queue — and each consumer's route (a
  :class:`WorkQueue`: its bindings, its arguments, its retry tiers), as the caller passes
  them: courier_common knows no service, so whoever builds the document names the consumers;
* the headers are those of :mod:`courier_common.messaging.headers` and W3C trace context;
* the AMQP 0-9-1 bindings (version 0.3.0) say what the declarer and the publisher do:
  durable exchanges, quorum queues, ``delivery_mode`` 2, ``mandatory``, manual acks.

:func:`contract_document` builds it; user-service serves its own (the messages it publishes)
at ``/asyncapi.json`` and ``make asyncapi`` writes the platform's, with every consumer's
route, to ``docs/asyncapi.yaml``.

One module of about 400 lines on purpose: the document is one tree whose parts refer to each
other by ``$ref`` names, and reading it top to bottom is reading the contract.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from courier_common.messaging import headers as names
from courier_common.messaging.deadletter import FailureKind
from courier_common.messaging.envelope import CONTENT_TYPE, EventData, event_model
from courier_common.messaging.retry import format_delay
from courier_common.messaging.topology import (
    DEAD_LETTER_EXCHANGE,
    EVENTS_EXCHANGE,
    DeadLetterQueue,
    WorkQueue,
)

ASYNCAPI_VERSION: Final = "3.0.0"
#: The version of the AMQP binding objects (asyncapi/bindings, amqp 0.3.0).
AMQP_BINDING_VERSION: Final = "0.3.0"
_SCHEMAS: Final = "#/components/schemas/"
_EVENTS_CHANNEL: Final = "courierEvents"
_W3C_TRACEPARENT: Final = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"


@dataclass(frozen=True, slots=True)
class Consumer:
    """A service that consumes from ``courier.events`` through its own work queue."""

    service: str
    queue: WorkQueue
    summary: str


def message_key(data_type: type[EventData]) -> str:
    """The component name of one event type and version: ``user.registered.v1``."""
    return f"{data_type.event_type}.v{data_type.event_version}"


def _channel_key(address: str) -> str:
    """A channel id from an address: ``crm.user-events`` → ``crmUserEvents``."""
    words = [w for w in re.split(r"[^a-zA-Z0-9]+", address) if w]
    return words[0] + "".join(w[:1].upper() + w[1:] for w in words[1:])


def _matches(binding_key: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` zero or more."""
    pattern, words = binding_key.split("."), routing_key.split(".")

    def match(i: int, j: int) -> bool:
        if i == len(pattern):
            return j == len(words)
        if pattern[i] == "#":
            return any(match(i + 1, k) for k in range(j, len(words) + 1))
        return j < len(words) and pattern[i] in ("*", words[j]) and match(i + 1, j + 1)

    return match(0, 0)


def _queue_binding(name: str) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "queue",
            "queue": {"name": name, "durable": True, "exclusive": False, "autoDelete": False},
            "bindingVersion": AMQP_BINDING_VERSION,
        }
    }


def _exchange_binding(name: str, kind: str) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "routingKey",
            "exchange": {"name": name, "type": kind, "durable": True, "autoDelete": False},
            "bindingVersion": AMQP_BINDING_VERSION,
        }
    }


def _ref(path: str) -> dict[str, str]:
    return {"$ref": path}


def _headers_schema() -> dict[str, Any]:
    """The AMQP headers of an event as it travels: trace context, attempt, replay marks."""
    return {
        "type": "object",
        "description": (
            "AMQP message headers. Besides these, every message carries the AMQP properties "
            "message_id (the event id: the key consumers deduplicate on), type (the event "
            "type), content_type application/json, timestamp (the event time) and "
            "delivery_mode 2."
        ),
        "properties": {
            "traceparent": {
                "type": "string",
                "pattern": _W3C_TRACEPARENT,
                "description": "W3C trace context of the publish; a consumer continues it.",
            },
            "tracestate": {"type": "string", "description": "W3C trace state, when set."},
            names.ATTEMPT: {
                "type": "integer",
                "minimum": 1,
                "description": "1 (or absent) on the first delivery; +1 on every retry hop.",
            },
            names.REPLAY_OF: {
                "type": "string",
                "description": "On a replayed dead letter: the archive record it came from.",
            },
            names.REPLAY_ID: {
                "type": "string",
                "description": "On a replayed dead letter: which replay sent it.",
            },
            names.ORIGINAL_EXCHANGE: {
                "type": "string",
                "description": "Set on the first retry hop: where the message was published.",
            },
            names.ORIGINAL_ROUTING_KEY: {
                "type": "string",
                "description": "Set on the first retry hop: its original routing key.",
            },
            names.FIRST_FAILED_AT: {
                "type": "string",
                "format": "date-time",
                "description": "Set on the first retry hop: when handling first failed.",
            },
        },
    }


def _dead_letter_headers_schema() -> dict[str, Any]:
    """What a dead letter adds to its headers: Courier's diagnosis and the broker's x-death."""
    return {
        "allOf": [
            _ref(_SCHEMAS + "CourierHeaders"),
            {
                "type": "object",
                "required": [names.FAILURE_KIND, names.FAILURE_REASON],
                "properties": {
                    names.FAILURE_KIND: {
                        "type": "string",
                        "enum": [kind.value for kind in FailureKind],
                        "description": "Why it was dead-lettered (Courier's or the broker's).",
                    },
                    names.FAILURE_REASON: {
                        "type": "string",
                        "description": "One line for an operator; personal data masked.",
                    },
                    names.EXCEPTION: {
                        "type": "string",
                        "description": "The exception's class, when one was raised.",
                    },
                    names.ORIGINAL_QUEUE: {
                        "type": "string",
                        "description": "The work queue whose consumer gave up: replay target.",
                    },
                    "x-death": {
                        "type": "array",
                        "description": "The broker's dead-lettering history (RabbitMQ).",
                    },
                },
            },
        ]
    }


def _messages(events: Sequence[type[EventData]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``components.messages`` and ``components.schemas`` for *events*."""
    mode: Literal["serialization"] = "serialization"  # what is on the wire
    models: list[tuple[type[BaseModel], Literal["serialization"]]] = [
        (event_model(data_type), mode) for data_type in events
    ]
    refs, top = models_json_schema(models, ref_template=_SCHEMAS + "{model}")
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    messages: dict[str, Any] = {}
    for data_type, model in zip(events, models, strict=True):
        payload = {
            "allOf": [
                refs[model],
                {  # what this message pins down in the envelope (always on the wire)
                    "type": "object",
                    "required": ["specversion", "datacontenttype"],
                    "properties": {
                        "type": {"const": data_type.event_type},
                        "version": {"const": data_type.event_version},
                    },
                },
            ]
        }
        messages[message_key(data_type)] = {
            "name": data_type.event_type,
            "title": f"{data_type.event_type} v{data_type.event_version}",
            "summary": (data_type.__doc__ or "").strip().splitlines()[0],
            "contentType": CONTENT_TYPE,
            "headers": _ref(_SCHEMAS + "CourierHeaders"),
            "payload": payload,
            "correlationId": {
                "description": "The event id; also the AMQP message_id.",
                "location": "$message.payload#/id",
            },
            "bindings": {
                "amqp": {
                    "contentEncoding": "utf-8",
                    "messageType": data_type.event_type,
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            },
        }
    schemas["CourierHeaders"] = _headers_schema()
    schemas["DeadLetterHeaders"] = _dead_letter_headers_schema()
    return messages, schemas


def _route_description(consumer: Consumer) -> str:
    queue = consumer.queue
    tiers = ", ".join(format_delay(d) for d in queue.retry.delays)
    arguments = ", ".join(f"{k}={v}" for k, v in sorted(queue.arguments().items()))
    return (
        f"{consumer.service}'s work queue: a quorum queue bound to {EVENTS_EXCHANGE} with "
        f"{', '.join(queue.binding_keys)}. A retryable failure waits in a retry tier "
        f"({queue.name}.retry.<delay>: {tiers}) and comes back through the default exchange; "
        f"after {queue.retry.max_attempts} attempts, or a permanent failure, the message goes "
        f"to {DEAD_LETTER_EXCHANGE} with its diagnosis. A replay comes back to this queue "
        f"alone. Arguments: {arguments}."
    )


def contract_document(
    events: Sequence[type[EventData]],
    *,
    title: str,
    version: str,
    publisher: str,
    consumers: Sequence[Consumer] = (),
    dead_letters: DeadLetterQueue | None = None,
    dead_letter_reader: str | None = None,
) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of *events* published by *publisher* on ``courier.events``.

    *consumers* adds each consumer's route: its queue channel, its retry tiers and its
    receive operation. *dead_letters* (with the service that reads them) adds the dead-letter
    exchange, its queue and what a dead letter carries.
    """
    messages, schemas = _messages(events)
    event_refs = {key: _ref(f"#/components/messages/{key}") for key in messages}
    channels: dict[str, Any] = {
        _EVENTS_CHANNEL: {
            "address": EVENTS_EXCHANGE,
            "title": EVENTS_EXCHANGE,
            "description": (
                "The topic exchange every user event is published to, routed by its type "
                "(user.registered, user.updated, user.deleted). A consumer binds a queue of "
                "its own to it with the routing keys it wants."
            ),
            "messages": event_refs,
            "bindings": _exchange_binding(EVENTS_EXCHANGE, "topic"),
        }
    }
    operations: dict[str, Any] = {}
    for data_type in events:
        key = message_key(data_type)
        operations[f"publish.{key}"] = {
            "action": "send",
            "channel": _ref(f"#/channels/{_EVENTS_CHANNEL}"),
            "title": f"{publisher} publishes {data_type.event_type}",
            "summary": (
                "Through a transactional outbox: at least once, in order per user, routing "
                f"key {data_type.event_type}, persistent, mandatory, confirmed by the broker."
            ),
            "messages": [_ref(f"#/channels/{_EVENTS_CHANNEL}/messages/{key}")],
            "bindings": {
                "amqp": {
                    "deliveryMode": 2,
                    "mandatory": True,
                    "timestamp": True,
                    "bindingVersion": AMQP_BINDING_VERSION,
                }
            },
        }
    for consumer in consumers:
        queue = consumer.queue
        channel = _channel_key(queue.name)
        received = {
            key: _ref(f"#/components/messages/{key}")
            for data_type, key in zip(events, messages, strict=True)
            if any(_matches(b, data_type.event_type) for b in queue.binding_keys)
        }
        channels[channel] = {
            "address": queue.name,
            "title": queue.name,
            "description": _route_description(consumer),
            "messages": received,
            "bindings": _queue_binding(queue.name),
            "x-courier-queue-arguments": queue.arguments(),
            "x-courier-binding-keys": list(queue.binding_keys),
            "x-courier-retry-tiers": [
                {
                    "queue": queue.retry_queue_name(delay),
                    "delay": format_delay(delay),
                    "arguments": queue.retry_arguments(delay),
                }
                for delay in queue.retry.delays
            ],
        }
        operations[f"{consumer.service}.receive"] = {
            "action": "receive",
            "channel": _ref(f"#/channels/{channel}"),
            "title": f"{consumer.service} consumes {queue.name}",
            "summary": consumer.summary,
            "messages": [_ref(f"#/channels/{channel}/messages/{key}") for key in received],
            "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING_VERSION}},
        }
    if dead_letters is not None:
        channels["deadLetterExchange"] = {
            "address": DEAD_LETTER_EXCHANGE,
            "title": DEAD_LETTER_EXCHANGE,
            "description": (
                "Fanout exchange every work queue dead-letters to, with the message's "
                "diagnosis in its headers; the broker's own dead-lettering (delivery limit, "
                "rejection) lands here too."
            ),
            "messages": {"deadLetter": _ref("#/components/messages/deadLetter")},
            "bindings": _exchange_binding(DEAD_LETTER_EXCHANGE, "fanout"),
        }
        channels["deadLetters"] = {
            "address": dead_letters.name,
            "title": dead_letters.name,
            "description": (
                f"Every dead letter, bound to {DEAD_LETTER_EXCHANGE}; no dead-letter exchange "
                "of its own, so its reader never rejects."
            ),
            "messages": {"deadLetter": _ref("#/components/messages/deadLetter")},
            "bindings": _queue_binding(dead_letters.name),
            "x-courier-queue-arguments": dead_letters.arguments(),
        }
        messages["deadLetter"] = {
            "name": "dead-letter",
            "title": "A dead letter",
            "summary": "A message no consumer could handle, as it was, with its diagnosis.",
            "contentType": CONTENT_TYPE,
            "headers": _ref(_SCHEMAS + "DeadLetterHeaders"),
            "payload": {
                "description": "The original body, unchanged (it may not even be JSON).",
            },
        }
        operations["deadLetter.send"] = {
            "action": "send",
            "channel": _ref("#/channels/deadLetterExchange"),
            "title": "A consumer dead-letters a message",
            "messages": [_ref("#/channels/deadLetterExchange/messages/deadLetter")],
        }
        if dead_letter_reader is not None:
            operations[f"{dead_letter_reader}.receive"] = {
                "action": "receive",
                "channel": _ref("#/channels/deadLetters"),
                "title": f"{dead_letter_reader} archives every dead letter",
                "messages": [_ref("#/channels/deadLetters/messages/deadLetter")],
                "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING_VERSION}},
            }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "id": "urn:courier:events",
        "info": {
            "title": title,
            "version": version,
            "description": (
                "Courier's user events: what user-service publishes on RabbitMQ, the "
                "CloudEvents envelope and headers every message carries, and the routes of "
                "the services that consume them. Generated from the code (make asyncapi)."
            ),
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": {
            "rabbitmq": {
                "host": "rabbitmq:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": (
                    "COURIER_AMQP_URL: the broker, or one URL per node of a cluster "
                    "(comma-separated). Every object is declared durable on the service's vhost."
                ),
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }
