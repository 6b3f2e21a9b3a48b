"""A consumer process for tests that kill, signal or restart workers.

Run as ``python -m tests.messaging.worker`` from libs/common with the environment:

* ``COURIER_AMQP_URL``, ``COURIER_REDIS_URL``: where to connect;
* ``WORKER_KEYS``: Redis key prefix for the worker's records;
* ``WORKER_BEHAVIOR``: ``record`` (default) or ``suicide`` (SIGKILL itself in the handler);
* ``WORKER_SLEEP``: seconds the handler waits before its effect;
* ``WORKER_IDEMPOTENT``: ``1`` to wrap the handler in the idempotency protocol;
* ``WORKER_LEASE``: the idempotency lease in seconds.

The handler records ``<keys>started`` (the event's n) when it begins and ``<keys>effects``
(the event id) as its effect. The process counts itself in ``<keys>ready`` once subscribed,
and drains on SIGTERM like a service does.
"""

from __future__ import annotations

import asyncio
import os
import signal

import redis.asyncio
from prometheus_client import CollectorRegistry

from courier_common.logging import configure_logging, get_logger
from courier_common.messaging import (
    AmqpConnection,
    ConsumerRunner,
    Event,
    IdempotencyStore,
    Router,
    declare_topology,
)
from courier_common.metrics import MessagingMetrics
from courier_testing.events import Pinged

from .support import TOPOLOGY, WORK

log = get_logger("test-worker")


async def main() -> int:
    configure_logging(level="INFO", fmt="json", service="test-worker")
    keys = os.environ["WORKER_KEYS"]
    behavior = os.environ.get("WORKER_BEHAVIOR", "record")
    pause = float(os.environ.get("WORKER_SLEEP", "0"))
    store = redis.asyncio.Redis.from_url(os.environ["COURIER_REDIS_URL"])

    async def handler(event: Event[Pinged]) -> None:
        await store.rpush(keys + "started", event.data.n)
        if behavior == "suicide":
            os.kill(os.getpid(), signal.SIGKILL)
        await asyncio.sleep(pause)
        await store.rpush(keys + "effects", str(event.id))

    router = Router()
    router.add(Pinged, handler)
    idempotency = None
    if os.environ.get("WORKER_IDEMPOTENT") == "1":
        idempotency = IdempotencyStore(
            store, prefix=keys, lease_seconds=float(os.environ.get("WORKER_LEASE", "2"))
        )
    connection = await AmqpConnection(
        os.environ["COURIER_AMQP_URL"], client_name="test-worker", heartbeat=5
    ).connect()
    await declare_topology(await connection.channel(), TOPOLOGY)
    runner = ConsumerRunner(
        connection=connection,
        queue=WORK,
        router=router,
        metrics=MessagingMetrics(CollectorRegistry()),
        consumer_name="test-worker",
        prefetch=int(os.environ.get("WORKER_PREFETCH", "10")),
        idempotency=idempotency,
    )
    await runner.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await store.incr(keys + "ready")
    await stop.wait()
    log.info("worker_stopping")
    drained = await runner.stop(timeout=float(os.environ.get("WORKER_DRAIN", "20")))
    await connection.close()
    await store.aclose()
    return 0 if drained else 3


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
