"""dlq-archiver: the archiving consumer, the erasure worker, replays, the HTTP API and console.

Wiring only; the process's life (waiting for the broker, draining on SIGTERM, ending on a
topology mismatch) is `courier_common.service`'s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from courier_common.events import USER_EVENTS
from courier_common.messaging import DeadLetterQueue, Topology
from courier_common.metrics import MessagingMetrics, service_registry
from courier_common.service import Parts, Resources, run_service, service_app
from dlq_archiver import console
from dlq_archiver.api import dead_letters
from dlq_archiver.archiving import ArchiveConsumer, ArchiverMetrics
from dlq_archiver.config import Settings
from dlq_archiver.erasure import Eraser
from dlq_archiver.housekeeping import Housekeeping
from dlq_archiver.replay import Replayer
from dlq_archiver.store import Archive

SERVICE = "dlq-archiver"


def create_app(settings: Settings) -> FastAPI:
    registry = service_registry()
    archiver_metrics = ArchiverMetrics(registry)
    messaging_metrics = MessagingMetrics(registry, event_types=[e.event_type for e in USER_EVENTS])
    group_size = settings.quorum_initial_group_size

    @asynccontextmanager
    async def build(resources: Resources) -> AsyncIterator[Parts]:
        connection = resources.connection
        archive = Archive(
            resources.redis, prefix=settings.redis_prefix, durability=settings.redis_durability()
        )
        consumer = ArchiveConsumer(
            connection=connection,
            archive=archive,
            metrics=archiver_metrics,
            queue=DeadLetterQueue(initial_group_size=group_size),
            prefetch=settings.amqp_prefetch,
        )
        eraser = Eraser(archive).runner(connection, settings, messaging_metrics)
        replayer = Replayer(
            archive=archive,
            connection=connection,
            metrics=archiver_metrics,
            messaging_metrics=messaging_metrics,
        )
        housekeeping = Housekeeping(settings, archive, consumer)
        tidy = resources.background("housekeeping", housekeeping.run, on_stop=housekeeping.stop)
        yield Parts(
            workers=[replayer, consumer, eraser, tidy],
            topology=Topology(work_queues=(eraser.queue,), initial_group_size=group_size),
            state={"settings": settings, "archive": archive, "replayer": replayer},
        )

    return service_app(
        SERVICE,
        settings,
        title="Courier dlq-archiver",
        description="Every dead letter with its diagnosis: list, group, replay, purge.",
        registry=registry,
        build=build,
        routers=[dead_letters.router, *([console.router] if settings.console_enabled else [])],
    )


def run() -> None:
    """Console entry point: ``dlq-archiver``."""
    settings = Settings()  # admin_token comes from the environment
    run_service(SERVICE, settings, lambda: create_app(settings))
