"""notification-service entry point: the consumer runner plus a small HTTP port for probes.

The worker starts in the lifespan and waits for the broker as long as it takes (``/readyz``
says so meanwhile: 503 with the reason, such as the broker refusing the configured vhost or
credentials, which is also logged once as critical). On SIGTERM uvicorn runs the lifespan
shutdown: the runner stops taking messages, finishes and acks what it holds, and the process
exits 0. A start that fails for any other reason is logged as critical and stops the process
(never a silently dead start task behind a live ``/healthz``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI
from redis.asyncio import Redis

from courier_common.events import USER_EVENTS
from courier_common.http import (
    NO_NATIVE_TELEMETRY,
    HttpMetrics,
    HttpMetricsMiddleware,
    health_router,
    run_service,
)
from courier_common.logging import get_logger
from courier_common.messaging import (
    DEAD_LETTER_QUEUE,
    AmqpConnection,
    ConsumerRunner,
    IdempotencyStore,
    Topology,
    TopologyMismatchError,
    WorkQueue,
    declare_topology,
)
from courier_common.messaging.backlog import BacklogMonitor, ManagementClient
from courier_common.messaging.connection import broker_state
from courier_common.metrics import MessagingMetrics, service_registry
from courier_common.redis import connect as redis_connect
from notification_service.config import Settings
from notification_service.handlers import NotificationMetrics, Notifier
from notification_service.rendering import Renderer
from notification_service.routes import user_events_queue
from notification_service.senders import EmailSender, HttpProvider

log = get_logger(__name__)
SERVICE = "notification-service"


@dataclass
class Worker:
    """What the lifespan starts and stops; ``/readyz`` reads it."""

    connection: AmqpConnection
    runner: ConsumerRunner
    backlog: BacklogMonitor
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self, work_queue: WorkQueue) -> None:
        try:
            await self.connection.connect(timeout=None)
            topology = Topology(
                work_queues=(work_queue,), initial_group_size=work_queue.initial_group_size
            )
            await declare_topology(await self.connection.channel(), topology)
            await self.runner.start()
        except TopologyMismatchError as exc:
            log.critical("topology_mismatch", error=str(exc))
            os.kill(os.getpid(), signal.SIGTERM)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.critical("worker_start_failed", error=repr(exc), exc_info=exc)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.backlog.start()
        self.started.set()


def create_app(settings: Settings) -> FastAPI:
    registry = service_registry()
    messaging_metrics = MessagingMetrics(registry, event_types=[e.event_type for e in USER_EVENTS])
    notification_metrics = NotificationMetrics(registry)
    http_metrics = HttpMetrics(registry)
    work_queue = user_events_queue(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = redis_connect(
            settings.redis_target(), max_connections=settings.redis_max_connections
        )
        http = httpx.AsyncClient(timeout=settings.provider_timeout_seconds)
        idempotency = IdempotencyStore(
            redis,
            prefix=settings.redis_prefix,
            lease_seconds=settings.idempotency_lease_seconds,
            retention_seconds=settings.idempotency_retention_seconds,
            metrics=messaging_metrics,
        )
        notifier = Notifier(
            email=EmailSender(
                host=settings.smtp_host,
                port=settings.smtp_port,
                sender=settings.smtp_from,
                timeout=settings.smtp_timeout_seconds,
                username=settings.smtp_username,
                password=(
                    settings.smtp_password.get_secret_value() if settings.smtp_password else None
                ),
                start_tls=settings.smtp_starttls,
            ),
            sms=HttpProvider(
                channel="sms",
                url=settings.sms_url,
                token=settings.sms_token.get_secret_value(),
                client=http,
            ),
            push=HttpProvider(
                channel="push",
                url=settings.push_url,
                token=settings.push_token.get_secret_value(),
                client=http,
            ),
            renderer=Renderer(),
            idempotency=idempotency,
            redis=redis,
            prefix=settings.redis_prefix,
            metrics=notification_metrics,
            erased_ttl_seconds=settings.erased_user_retention_seconds,
            durability=settings.redis_durability(),
        )
        connection = AmqpConnection(
            settings.amqp_url, client_name=SERVICE, heartbeat=settings.amqp_heartbeat_seconds
        )
        worker = Worker(
            connection=connection,
            runner=ConsumerRunner(
                connection=connection,
                queue=work_queue,
                router=notifier.router(),
                metrics=messaging_metrics,
                consumer_name=SERVICE,
                prefetch=settings.amqp_prefetch,
            ),
            backlog=BacklogMonitor(
                ManagementClient(settings.management_urls),
                vhost=settings.amqp_vhost,
                queues=[
                    work_queue.name,
                    *work_queue.retry_queue_names,
                    DEAD_LETTER_QUEUE,
                ],
                metrics=messaging_metrics,
                interval=settings.backlog_poll_seconds,
            ),
        )
        app.state.worker = worker
        app.state.redis = redis
        starting = asyncio.create_task(worker.start(work_queue))
        try:
            yield
        finally:
            if not starting.done():
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
            if worker.started.is_set():
                await worker.runner.stop(timeout=settings.drain_timeout_seconds)
            await worker.backlog.stop()
            await connection.close()
            await notifier.email.close()  # QUIT on the SMTP connections kept for reuse
            await http.aclose()
            await redis.aclose()

    async def readiness() -> Mapping[str, Any]:
        worker: Worker = app.state.worker
        redis: Redis = app.state.redis
        try:
            redis_ok = bool(await redis.ping())
        except Exception as exc:
            redis_ok = False
            log.warning("redis_ping_failed", error=type(exc).__name__)
        connection = worker.connection
        consuming = worker.started.is_set() and connection.is_connected
        report: dict[str, Any] = {
            "ready": redis_ok and consuming,
            "redis": "ok" if redis_ok else "down",
            "broker": broker_state(connection),
            "consuming": consuming,
            "in_flight": worker.runner.in_flight,
        }
        if connection.problem:
            report["broker_problem"] = connection.problem
        return report

    app = FastAPI(
        title="Courier notification-service",
        version="0.1.0",
        lifespan=lifespan,
        telemetry=NO_NATIVE_TELEMETRY,
    )
    app.include_router(health_router(readiness=readiness, registry=registry))
    app.add_middleware(HttpMetricsMiddleware, metrics=http_metrics)
    return app


def run() -> None:
    """Console entry point: ``notification-service``."""
    settings = Settings()
    run_service(SERVICE, settings, lambda: create_app(settings))
