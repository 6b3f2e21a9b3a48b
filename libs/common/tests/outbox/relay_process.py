"""One outbox relay as a process of its own, for the tests that SIGKILL it mid-batch.

Run as ``python libs/common/tests/outbox/relay_process.py`` with a service's environment
(``COURIER_AMQP_URL``, ``COURIER_REDIS_URL``, ``COURIER_OUTBOX_*``; `OutboxSettings`) and
``RELAY_STREAM`` (the outbox stream), ``RELAY_CONSUMER`` (its name in the consumer group).
It relays to the platform topology until SIGTERM, as a service's relay task does.
"""

from __future__ import annotations

import asyncio
import os
import signal

import redis.asyncio
from prometheus_client import CollectorRegistry

from courier_common.logging import configure_logging
from courier_common.messaging import AmqpConnection, Topology
from courier_common.metrics import MessagingMetrics
from courier_common.outbox import OutboxMetrics, OutboxRelay
from courier_common.settings import OutboxSettings


async def main() -> None:
    settings = OutboxSettings()
    configure_logging(level="INFO", fmt="json", service="outbox-test-relay")
    client = redis.asyncio.Redis.from_url(
        settings.redis_url, socket_timeout=settings.outbox_block_ms / 1000 + 10
    )
    connection = AmqpConnection(
        settings.amqp_url,
        client_name="outbox-test-relay",
        heartbeat=settings.amqp_heartbeat_seconds,
    )
    registry = CollectorRegistry()
    relay = OutboxRelay(
        redis=client,
        stream=os.environ["RELAY_STREAM"],
        connection=connection,
        topology=Topology(),
        metrics=OutboxMetrics(registry),
        messaging_metrics=MessagingMetrics(registry),
        batch_size=settings.outbox_batch_size,
        block_ms=settings.outbox_block_ms,
        claim_idle_ms=settings.outbox_claim_idle_ms,
        retry_max_seconds=settings.outbox_retry_max_seconds,
        consumer=os.environ["RELAY_CONSUMER"],
    )
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, relay.stop)
    try:
        await relay.run()
    finally:
        await connection.close()
        await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
