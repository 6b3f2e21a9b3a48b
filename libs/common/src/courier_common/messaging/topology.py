"""Courier's RabbitMQ topology: the platform's objects, the work-queue type, the declarer.

courier_common owns what every service shares — the events exchange ``courier.events``, the
dead-letter exchange ``courier.dlx`` and its queue ``courier.dead-letters`` — and the
:class:`WorkQueue` type. It names no service's queue: each consuming service defines its own
work queue(s) beside its handlers (binding keys, retry tiers, limits, from its settings) and
declares them with the platform objects (:func:`declare_topology`). A publisher declares only
the platform: it does not know who consumes.

Every object is declared idempotently. When a queue already exists with other arguments,
startup fails with :class:`TopologyMismatchError` naming the argument, instead of the broker's
channel error surfacing somewhere else later.

Quorum queues are created with ``x-quorum-initial-group-size`` (the setting
``COURIER_QUORUM_INITIAL_GROUP_SIZE``; RabbitMQ caps it at the cluster's size). The broker
checks that argument for equivalence on every re-declaration like any other, although it only
matters at creation: a queue created without it (every deployment before the setting) or with
another value would fail with PRECONDITION_FAILED and stop the service on upgrade. So
:func:`declare_queue` adopts the value the existing queue has for that one argument (members
of an existing queue are managed with ``rabbitmq-queues grow/shrink``, not by re-declaring).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange, AbstractQueue, AbstractRobustChannel

from courier_common.logging import get_logger
from courier_common.messaging.retry import RetryPolicy, format_delay

log = get_logger(__name__)

EVENTS_EXCHANGE = "courier.events"
DEAD_LETTER_EXCHANGE = "courier.dlx"
DEAD_LETTER_QUEUE = "courier.dead-letters"
#: The broker's nameless direct exchange: routing key = queue name. Retry hops use it.
DEFAULT_EXCHANGE = ""
#: The quorum-queue argument for the number of members a new queue gets.
INITIAL_GROUP_SIZE = "x-quorum-initial-group-size"


class TopologyMismatchError(RuntimeError):
    """A queue or exchange exists with other properties than Courier declares."""


@dataclass(frozen=True, slots=True)
class WorkQueue:
    """A quorum queue a service consumes, with its retry tiers and dead-lettering: a route.

    The consuming service defines it (name, the ``courier.events`` binding keys it wants, its
    retry policy and limits); the runner retries through its tiers and dead-letters to
    ``courier.dlx``; a replay comes back to it through the default exchange.

    ``delivery_limit`` catches the worker that dies before deciding (the broker counts the
    redelivery and dead-letters the message past the limit); ``max_length`` with
    ``x-overflow=reject-publish`` makes a full queue refuse publishes (the publisher sees a
    nack) rather than drop the oldest message.
    """

    name: str
    binding_keys: tuple[str, ...]
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    delivery_limit: int = 5
    max_length: int | None = None
    #: Members at creation (``x-quorum-initial-group-size``); None leaves the broker's default.
    initial_group_size: int | None = None

    def retry_queue_name(self, delay: timedelta) -> str:
        return f"{self.name}.retry.{format_delay(delay)}"

    @property
    def retry_queue_names(self) -> tuple[str, ...]:
        return tuple(self.retry_queue_name(d) for d in self.retry.delays)

    def arguments(self) -> dict[str, Any]:
        args: dict[str, Any] = {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
        if self.max_length is not None:
            args["x-max-length"] = self.max_length
        if self.initial_group_size is not None:
            args[INITIAL_GROUP_SIZE] = self.initial_group_size
        return args

    def retry_arguments(self, delay: timedelta) -> dict[str, Any]:
        """A retry tier: messages wait ``delay`` then dead-letter back to the work queue."""
        args: dict[str, Any] = {
            "x-queue-type": "quorum",
            "x-message-ttl": round(delay.total_seconds() * 1000),
            "x-dead-letter-exchange": DEFAULT_EXCHANGE,
            "x-dead-letter-routing-key": self.name,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
        if self.initial_group_size is not None:
            args[INITIAL_GROUP_SIZE] = self.initial_group_size
        return args


@dataclass(frozen=True, slots=True)
class DeadLetterQueue:
    """``courier.dead-letters``: every dead letter, from ``courier.dlx``, for the archiver.

    It has no dead-letter exchange of its own (a dead letter that died again would come back
    to it), so its consumer never rejects: it stores, or gives the message back.
    """

    name: str = DEAD_LETTER_QUEUE
    #: Members at creation (``x-quorum-initial-group-size``); None leaves the broker's default.
    initial_group_size: int | None = None

    def arguments(self) -> dict[str, Any]:
        args: dict[str, Any] = {"x-queue-type": "quorum"}
        if self.initial_group_size is not None:
            args[INITIAL_GROUP_SIZE] = self.initial_group_size
        return args


#: The platform's dead-letter queue.
DEAD_LETTERS = DeadLetterQueue()


@dataclass(frozen=True, slots=True)
class Topology:
    """What one service declares on its vhost: the platform, plus its own work queues."""

    work_queues: tuple[WorkQueue, ...] = ()
    events_exchange: str = EVENTS_EXCHANGE
    dead_letter_exchange: str = DEAD_LETTER_EXCHANGE
    dead_letter_queue: str = DEAD_LETTER_QUEUE
    #: ``x-quorum-initial-group-size`` of the dead-letter queue (None: the broker's default).
    initial_group_size: int | None = None

    def work_queue(self, name: str) -> WorkQueue:
        for queue in self.work_queues:
            if queue.name == name:
                return queue
        raise KeyError(f"no work queue named {name!r} in this topology")

    @property
    def dead_letter_queue_arguments(self) -> dict[str, Any]:
        return DeadLetterQueue(self.dead_letter_queue, self.initial_group_size).arguments()


@dataclass(slots=True)
class DeclaredTopology:
    """Handles to what was declared. Hold on to it: aio-pika keeps these weakly."""

    exchanges: dict[str, AbstractExchange] = field(default_factory=dict)
    queues: dict[str, AbstractQueue] = field(default_factory=dict)


_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for (?P<kind>queue|exchange) '(?P<name>[^']+)'"
    r"(?: in vhost '[^']*')?: received (?P<received>.+?) but current is (?P<current>.+)$"
)


def _mismatch(exc: aiormq.exceptions.ChannelPreconditionFailed, kind: str, name: str) -> Exception:
    text = str(exc.args[0] if exc.args else exc)
    found = _INEQUIVALENT.search(text.strip("'\" )"))
    if found:
        return TopologyMismatchError(
            f"{found['kind']} '{found['name']}' already exists with a different "
            f"'{found['arg']}': Courier declares {found['received']}, the broker has "
            f"{found['current']}. Delete or migrate the {found['kind']} (e.g. with a "
            "policy or a shovel), or align the configuration."
        )
    return TopologyMismatchError(f"{kind} '{name}' exists with other properties: {text}")


_GROUP_SIZE_CURRENT = re.compile(
    rf"inequivalent arg '{INITIAL_GROUP_SIZE}' for queue .*? but current is "
    r"(?:none|the value '(?P<value>\d+)'|'(?P<plain>\d+)')"
)


def _existing_group_size(exc: aiormq.exceptions.ChannelPreconditionFailed) -> int | bool | None:
    """The existing queue's group size when *exc* is about that argument alone, else False."""
    found = _GROUP_SIZE_CURRENT.search(str(exc.args[0] if exc.args else exc))
    if not found:
        return False
    value = found["value"] or found["plain"]
    return int(value) if value else None


async def _reopened(channel: AbstractRobustChannel, timeout: float = 15.0) -> None:
    """Until the robust channel the broker just closed is open again (it reopens by itself)."""
    async with asyncio.timeout(timeout):
        while True:
            await channel.ready()
            try:
                if not (await channel.get_underlay_channel()).is_closed:
                    return
            except aiormq.exceptions.ChannelInvalidStateError:
                pass
            await asyncio.sleep(0.02)


async def declare_queue(
    channel: AbstractRobustChannel, name: str, arguments: dict[str, Any]
) -> AbstractQueue:
    """Declare a durable queue; a mismatch raises :class:`TopologyMismatchError`.

    A mismatch in ``x-quorum-initial-group-size`` alone is not one: that argument only acts at
    creation, so the queue is declared again with the value it already has (see module doc).
    """
    try:
        return await channel.declare_queue(name, durable=True, arguments=arguments)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        existing = _existing_group_size(exc)
        if existing is False:
            raise _mismatch(exc, "queue", name) from exc
    adopted = {k: v for k, v in arguments.items() if k != INITIAL_GROUP_SIZE}
    if existing is not None:
        adopted[INITIAL_GROUP_SIZE] = existing
    log.info(
        "quorum_queue_group_size_kept",
        queue=name,
        configured=arguments.get(INITIAL_GROUP_SIZE),
        existing=existing,
    )
    await _reopened(channel)
    try:
        return await channel.declare_queue(name, durable=True, arguments=adopted)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise _mismatch(exc, "queue", name) from exc


async def _declare_exchange(
    channel: AbstractRobustChannel, name: str, kind: aio_pika.ExchangeType
) -> AbstractExchange:
    try:
        return await channel.declare_exchange(name, kind, durable=True)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise _mismatch(exc, "exchange", name) from exc


async def declare_topology(channel: AbstractRobustChannel, topology: Topology) -> DeclaredTopology:
    """Declare every exchange, queue, retry tier and binding; safe to run on every start.

    Declared on a robust channel, so aio-pika re-declares all of it after a reconnect
    (a broker that lost its data gets the topology back before consumers resubscribe).
    """
    declared = DeclaredTopology()
    events = await _declare_exchange(channel, topology.events_exchange, aio_pika.ExchangeType.TOPIC)
    dlx = await _declare_exchange(
        channel, topology.dead_letter_exchange, aio_pika.ExchangeType.FANOUT
    )
    declared.exchanges = {events.name: events, dlx.name: dlx}

    dead = await declare_queue(
        channel, topology.dead_letter_queue, topology.dead_letter_queue_arguments
    )
    await dead.bind(dlx, routing_key="#")
    declared.queues[dead.name] = dead

    for work in topology.work_queues:
        queue = await declare_queue(channel, work.name, work.arguments())
        for key in work.binding_keys:
            await queue.bind(events, routing_key=key)
        declared.queues[queue.name] = queue
        for delay in work.retry.delays:
            tier = await declare_queue(
                channel, work.retry_queue_name(delay), work.retry_arguments(delay)
            )
            declared.queues[tier.name] = tier
    return declared
