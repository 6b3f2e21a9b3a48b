"""The outbox relay: moves events from a Redis stream to RabbitMQ, losing none.

It publishes the entries :mod:`courier_common.outbox.store` writes to the topology's events
exchange; the caller names the stream, the topology and the batch settings, so it serves any
service's outbox.

Replicas share the work through a Redis consumer group. An entry is acknowledged and deleted
only after the broker confirmed its publish; until then it stays pending, owned by the
replica that read it. A failed publish is retried with backoff (while other entries keep
flowing), and entries owned by a replica that stopped (it died mid-batch) are claimed by
another once they have been idle for ``claim_idle_ms``. A relay that dies between the confirm
and the acknowledgement republishes the entry: a duplicate with the same event id, which
consumers deduplicate.

Behind Sentinel (``COURIER_REDIS_MIN_REPLICAS`` > 0) a batch is published only once the
replicas have it: the relay confirms the batch's newest entry (``XRANGE`` of its id, a fence
and ``WAIT``, on one connection) first. A change answered 503 because its replicas were late
is in the outbox of a primary that may yet be replaced without it; its event must wait until
the replicas confirm it, or never go out if a failover takes it (no welcome for a
registration that was taken back). (The stream is a prefix of the old primary's history on
any replica, so the newest entry standing for the batch is enough.) The acknowledgement and
deletion after the publish are *not* confirmed: a failover that loses them costs a
republish, which consumers deduplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import redis.exceptions
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio import Redis

from courier_common.backoff import Backoff
from courier_common.logging import get_logger
from courier_common.messaging import (
    AmqpConnection,
    OutgoingMessage,
    Publisher,
    PublishNackedError,
    Topology,
)
from courier_common.messaging.topology import declare_topology
from courier_common.messaging.tracing import extract_context
from courier_common.metrics import MessagingMetrics
from courier_common.redis import Durability
from courier_common.settings import OutboxSettings

log = get_logger(__name__)

#: The relay's consumer group on an outbox stream (the runbooks ``XPENDING`` it by this name).
GROUP = "relay"
#: Consumers of the group that hold nothing and have been idle this long are forgotten.
STALE_CONSUMER_MS = 3_600_000


class OutboxMetrics:
    """The outbox as Prometheus sees it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.backlog = Gauge(
            "courier_outbox_backlog",
            "Events written to the outbox and not yet confirmed by the broker.",
            registry=registry,
        )
        self.oldest_age = Gauge(
            "courier_outbox_oldest_age_seconds",
            "Age of the oldest event still in the outbox (0 when empty).",
            registry=registry,
        )
        self.relayed = Counter(
            "courier_outbox_relayed",
            "Outbox entries by relay outcome: published (confirmed and removed), "
            "failed (kept for a retry), reclaimed (taken over from a stopped replica).",
            ["outcome"],
            registry=registry,
        )


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry as read: its id and fields (those of `EntryFields`; none if deleted)."""

    id: str
    fields: dict[str, str]


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _stream_entries(reply: Any) -> list[Entry]:
    """Entries of the one stream in an XREADGROUP reply (RESP2: [[stream, entries]])."""
    return _entries(reply[0][1]) if reply else []


def _entries(raw: Any) -> list[Entry]:
    """Entries from an XREADGROUP/XAUTOCLAIM reply; deleted ones come back with no fields."""
    out = []
    for entry_id, fields in raw or []:
        decoded = {_decode(k): _decode(v) for k, v in (fields or {}).items()}
        out.append(Entry(_decode(entry_id), decoded))
    return out


class OutboxRelay:
    """One replica's relay loop."""

    def __init__(
        self,
        *,
        redis: Redis,
        stream: str,
        connection: AmqpConnection,
        topology: Topology,
        metrics: OutboxMetrics,
        messaging_metrics: MessagingMetrics,
        batch_size: int = 200,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        retry_max_seconds: float = 5.0,
        consumer: str | None = None,
        durability: Durability | None = None,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.connection = connection
        self.topology = topology
        self.metrics = metrics
        self.messaging_metrics = messaging_metrics
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.retry_max_seconds = retry_max_seconds
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.durability = durability or Durability()
        #: Seconds to wait for the broker's confirm of one batch.
        self.confirm_timeout = 10.0
        self._stopping = asyncio.Event()
        self._publisher: Publisher | None = None
        self._retry_at = 0.0
        self._backoff = Backoff(initial=0.2, maximum=retry_max_seconds)
        self._next_claim = 0.0
        self._next_gauges = 0.0

    @classmethod
    def from_settings(
        cls,
        settings: OutboxSettings,
        *,
        redis: Redis,
        stream: str,
        connection: AmqpConnection,
        topology: Topology,
        metrics: OutboxMetrics,
        messaging_metrics: MessagingMetrics,
    ) -> OutboxRelay:
        """The relay a service runs, with its batch, claim and retry settings."""
        return cls(
            redis=redis,
            stream=stream,
            connection=connection,
            topology=topology,
            metrics=metrics,
            messaging_metrics=messaging_metrics,
            batch_size=settings.outbox_batch_size,
            block_ms=settings.outbox_block_ms,
            claim_idle_ms=settings.outbox_claim_idle_ms,
            retry_max_seconds=settings.outbox_retry_max_seconds,
            durability=settings.redis_durability(),
        )

    @property
    def broker_connected(self) -> bool:
        return self.connection.is_connected

    async def ensure_group(self) -> None:
        """Create the consumer group reading from the start, so no entry is skipped."""
        try:
            await self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self) -> None:
        """Relay until :meth:`stop`. Waits for the broker as long as it takes."""
        await self.ensure_group()
        await self.connection.connect(timeout=None)
        channel = await self.connection.channel()
        await declare_topology(channel, self.topology)
        self._publisher = Publisher(
            await self.connection.channel(),
            metrics=self.messaging_metrics,
            confirm_timeout=self.confirm_timeout,
        )
        log.info("outbox_relay_started", consumer=self.consumer, stream=self.stream)
        while not self._stopping.is_set():
            try:
                await self.relay_once()
            except redis.exceptions.RedisError as exc:
                log.warning("outbox_redis_error", error=repr(exc))
                await self._sleep(1.0)
        log.info("outbox_relay_stopped", consumer=self.consumer)

    def stop(self) -> None:
        self._stopping.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def relay_once(self) -> int:
        """Publish one batch; return how many entries were confirmed."""
        now = time.monotonic()
        if now >= self._next_gauges:
            await self.update_gauges()
            self._next_gauges = now + 2.0
        entries = await self._next_batch(now)
        if not entries or not await self._replicated(entries):
            return 0
        return await self._publish(entries)

    async def _replicated(self, entries: list[Entry]) -> bool:
        """True once the replicas have the batch (always, without replicas required).

        Raises ``NotReplicatedError`` (the run loop waits and tries again) when they do not
        confirm in time; False when the newest entry is not on the primary any more (the
        batch was read from one that was replaced): what of it survived is read again.
        """
        live = [e.id for e in entries if "event" in e.fields]
        if not self.durability.enabled or not live:
            return True
        newest = live[-1]
        (found,) = await self.durability.commands(
            self.redis, lambda pipe: pipe.xrange(self.stream, newest, newest)
        )
        if not found:
            log.warning("outbox_batch_not_on_primary", entries=len(entries), newest=newest)
            return False
        return True

    async def _next_batch(self, now: float) -> list[Entry]:
        if now >= self._retry_at:
            # Our own pending entries first: read earlier, not yet confirmed.
            mine = await self.redis.xreadgroup(
                GROUP, self.consumer, {self.stream: "0"}, count=self.batch_size
            )
            entries = _stream_entries(mine)
            if entries:
                return entries
        if now >= self._next_claim:
            self._next_claim = now + self.claim_idle_ms / 2000
            claimed = await self._claim_abandoned()
            if claimed:
                return claimed
        fresh = await self.redis.xreadgroup(
            GROUP,
            self.consumer,
            {self.stream: ">"},
            count=self.batch_size,
            block=self.block_ms,
        )
        return _stream_entries(fresh)

    async def _claim_abandoned(self) -> list[Entry]:
        reply = await self.redis.xautoclaim(
            self.stream,
            GROUP,
            self.consumer,
            min_idle_time=self.claim_idle_ms,
            start_id="0-0",
            count=self.batch_size,
        )
        entries = _entries(reply[1])
        if entries:
            self.metrics.relayed.labels("reclaimed").inc(len(entries))
            log.info("outbox_entries_reclaimed", count=len(entries))
        await self._forget_stale_consumers()
        return entries

    async def _forget_stale_consumers(self) -> None:
        for info in await self.redis.xinfo_consumers(self.stream, GROUP):
            name = _decode(info["name"])
            if name != self.consumer and info["pending"] == 0 and info["idle"] > STALE_CONSUMER_MS:
                await self.redis.xgroup_delconsumer(self.stream, GROUP, name)

    async def _publish(self, entries: list[Entry]) -> int:
        assert self._publisher is not None
        gone = [e.id for e in entries if "event" not in e.fields]  # deleted, still pending
        live = [e for e in entries if "event" in e.fields]
        exchange = self.topology.events_exchange
        results = await self._publisher.publish_many([_message(e, exchange) for e in live])
        confirmed = [e.id for e, error in zip(live, results, strict=True) if error is None]
        failed = [(e, error) for e, error in zip(live, results, strict=True) if error is not None]
        done = confirmed + gone
        if done:
            # Not confirmed by the replicas (no WAIT): a failover that loses this costs a
            # republish of these entries, which consumers deduplicate by event id.
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xack(self.stream, GROUP, *done)
                pipe.xdel(self.stream, *done)
                await pipe.execute()
            self.metrics.relayed.labels("published").inc(len(confirmed))
        if failed:
            self.metrics.relayed.labels("failed").inc(len(failed))
            delay = self._backoff.next()
            self._retry_at = time.monotonic() + delay
            log.warning(
                "outbox_publish_failed",
                failed=len(failed),
                confirmed=len(confirmed),
                error=str(failed[0][1]),
                retry_in_s=round(delay, 2),
            )
            if not confirmed:
                if any(isinstance(error, PublishNackedError) for _, error in failed):
                    await self._renew_publisher()
                # Nothing gets through (the broker is down): wait instead of spinning on
                # new entries that would fail the same way.
                await self._sleep(delay)
        else:
            self._backoff.reset()
            self._retry_at = 0.0
        return len(confirmed)

    async def _renew_publisher(self) -> None:
        """Publish on a fresh channel after the broker refused a whole batch.

        A refusal can be a full queue, which a new channel does not change, or a channel that
        first published to a quorum queue while the queue had no leader (a node died and the
        election was still running): seen in C1, such a channel kept refusing every publish
        for minutes after the new leader was up, while a new channel publishes at once
        (rabbitmq-server#15333 describes the channel's stuck enqueuer). Opening one costs a
        round trip, on this failure path only.
        """
        old = self._publisher
        try:
            channel = await self.connection.channel()
        except Exception as exc:  # the broker is away: the robust connection brings it back
            log.warning("outbox_channel_renew_failed", error=repr(exc))
            return
        self._publisher = Publisher(
            channel, metrics=self.messaging_metrics, confirm_timeout=self.confirm_timeout
        )
        log.info("outbox_channel_renewed")
        if old is not None:
            with contextlib.suppress(Exception):
                await old.channel.close()

    async def update_gauges(self) -> None:
        backlog = await self.redis.xlen(self.stream)
        self.metrics.backlog.set(backlog)
        oldest = await self.redis.xrange(self.stream, count=1) if backlog else []
        if oldest:
            millis = int(_decode(oldest[0][0]).split("-", 1)[0])
            self.metrics.oldest_age.set(max(0.0, time.time() - millis / 1000))
        else:
            self.metrics.oldest_age.set(0)


def _message(entry: Entry, exchange: str) -> OutgoingMessage:
    fields = entry.fields
    carrier = {k: fields[k] for k in ("traceparent", "tracestate") if fields.get(k)}
    return OutgoingMessage(
        exchange=exchange,
        routing_key=fields["routing_key"],
        body=fields["event"].encode(),
        message_id=fields.get("event_id"),
        type=fields["routing_key"],
        trace_context=extract_context(carrier) if carrier else None,
    )
