"""notification-service: the consumer of user events, with a port for probes and metrics.

Wiring only; the process's life (waiting for the broker, draining on SIGTERM, ending on a
topology mismatch) is `courier_common.service`'s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from courier_common.events import USER_EVENTS
from courier_common.messaging import ConsumerRunner, Topology
from courier_common.messaging.backlog import BacklogMonitor
from courier_common.metrics import MessagingMetrics, service_registry
from courier_common.service import Parts, Resources, run_service, service_app
from notification_service.config import Settings
from notification_service.handlers import NotificationMetrics, Notifier
from notification_service.routes import user_events_queue

SERVICE = "notification-service"


def create_app(settings: Settings) -> FastAPI:
    registry = service_registry()
    messaging_metrics = MessagingMetrics(registry, event_types=[e.event_type for e in USER_EVENTS])
    notification_metrics = NotificationMetrics(registry)
    queue = user_events_queue(settings)

    @asynccontextmanager
    async def build(resources: Resources) -> AsyncIterator[Parts]:
        async with httpx.AsyncClient(timeout=settings.provider_timeout_seconds) as http:
            notifier = Notifier.from_settings(
                settings,
                redis=resources.redis,
                http=http,
                metrics=notification_metrics,
                messaging_metrics=messaging_metrics,
            )
            runner = ConsumerRunner(
                connection=resources.connection,
                queue=queue,
                router=notifier.router(),
                metrics=messaging_metrics,
                consumer_name=SERVICE,
                prefetch=settings.amqp_prefetch,
            )
            backlog = BacklogMonitor.for_work_queue(settings, queue, messaging_metrics)
            try:
                yield Parts(
                    workers=[runner, backlog],
                    topology=Topology(
                        work_queues=(queue,), initial_group_size=queue.initial_group_size
                    ),
                    report=lambda: {"in_flight": runner.in_flight},
                )
            finally:
                await notifier.email.close()  # QUIT on the SMTP connections kept for reuse

    return service_app(
        SERVICE,
        settings,
        title="Courier notification-service",
        registry=registry,
        build=build,
    )


def run() -> None:
    """Console entry point: ``notification-service``."""
    settings = Settings()
    run_service(SERVICE, settings, lambda: create_app(settings))
