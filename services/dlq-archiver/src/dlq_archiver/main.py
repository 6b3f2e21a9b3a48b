"""dlq-archiver entry point: the archiving consumer, the erasure worker and the HTTP API."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

from courier_common.events import USER_EVENTS
from courier_common.http import (
    NO_NATIVE_TELEMETRY,
    BodySizeLimitMiddleware,
    HttpMetrics,
    HttpMetricsMiddleware,
    health_router,
    install_problem_handlers,
    run_service,
)
from courier_common.logging import get_logger
from courier_common.messaging import (
    AmqpConnection,
    ConsumerRunner,
    DeadLetterQueue,
    Publisher,
    Topology,
    TopologyMismatchError,
    declare_topology,
)
from courier_common.messaging.connection import broker_state
from courier_common.metrics import MessagingMetrics, service_registry
from courier_common.redis import STORAGE_ERRORS
from courier_common.redis import connect as redis_connect
from courier_common.tasks import cancel_and_wait, pause
from dlq_archiver.api import dead_letters
from dlq_archiver.archiving import ArchiveConsumer, ArchiverMetrics
from dlq_archiver.config import Settings
from dlq_archiver.erasure import Eraser
from dlq_archiver.replay import Replayer
from dlq_archiver.routes import erasure_queue
from dlq_archiver.store import Archive

log = get_logger(__name__)
SERVICE = "dlq-archiver"


class Workers:
    """Everything that talks to the broker; started in the background, stopped together."""

    def __init__(
        self,
        settings: Settings,
        archive: Archive,
        connection: AmqpConnection,
        archiver_metrics: ArchiverMetrics,
        messaging_metrics: MessagingMetrics,
    ) -> None:
        self.settings = settings
        self.archive = archive
        self.connection = connection
        erasure = erasure_queue(settings)
        self.topology = Topology(
            work_queues=(erasure,), initial_group_size=settings.quorum_initial_group_size
        )
        self.consumer = ArchiveConsumer(
            connection=connection,
            archive=archive,
            metrics=archiver_metrics,
            queue=DeadLetterQueue(initial_group_size=settings.quorum_initial_group_size),
            prefetch=settings.amqp_prefetch,
        )
        self.eraser = ConsumerRunner(
            connection=connection,
            queue=erasure,
            router=Eraser(archive).router(),
            metrics=messaging_metrics,
            consumer_name=SERVICE,
            prefetch=10,
        )
        self.replayer: Replayer | None = None
        self.archiver_metrics = archiver_metrics
        self.messaging_metrics = messaging_metrics
        self.started = asyncio.Event()
        self.stopping = asyncio.Event()

    async def start(self) -> None:
        try:
            await self.connection.connect(timeout=None)
            await declare_topology(await self.connection.channel(), self.topology)
            self.replayer = Replayer(
                archive=self.archive,
                publisher=Publisher(
                    await self.connection.channel(), metrics=self.messaging_metrics
                ),
                metrics=self.archiver_metrics,
            )
            for job_id in await self.archive.running_jobs():  # the process died mid-job
                await self.archive.update_job(job_id, status="interrupted")
            await self.consumer.start()
            await self.eraser.start()
        except TopologyMismatchError as exc:
            log.critical("topology_mismatch", error=str(exc))
            os.kill(os.getpid(), signal.SIGTERM)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never a silently dead start task behind a live /healthz
            log.critical("worker_start_failed", error=repr(exc), exc_info=exc)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.started.set()

    async def housekeeping(self) -> None:
        """Retention trimming and the archive gauges, until the workers stop."""
        settings = self.settings
        next_trim = 0.0
        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            try:
                if loop.time() >= next_trim:
                    removed = await self.archive.trim(
                        max_age_seconds=(
                            settings.retention_max_age_days * 86400
                            if settings.retention_max_age_days
                            else None
                        ),
                        max_count=settings.retention_max_count,
                    )
                    if removed:
                        await self.archive.audit("retention", what={}, count=removed)
                        log.info("dead_letters_trimmed", count=removed)
                    next_trim = loop.time() + settings.retention_interval_seconds
                await self.consumer.update_gauges(settings.top_groups_metric)
            except Exception:
                log.exception("housekeeping_failed")
            await pause(self.stopping, settings.gauges_interval_seconds)

    async def stop(self) -> None:
        """Stop replay jobs and both consumers at once, each within the drain timeout.

        In-flight dead letters are archived and acked, or left unacked for redelivery (the
        archive deduplicates); a replay job stops between two replays, marked interrupted.
        Safe to call when :meth:`start` did not finish: what never started has nothing to stop.
        """
        self.stopping.set()
        drain = self.settings.drain_timeout_seconds
        stops: list[Awaitable[object]] = [
            self.consumer.stop(timeout=drain),
            self.eraser.stop(timeout=drain),
        ]
        if self.replayer is not None:
            stops.append(self.replayer.stop(timeout=drain))
        await asyncio.gather(*stops)


def create_app(settings: Settings) -> FastAPI:
    registry = service_registry()
    http_metrics = HttpMetrics(registry)
    archiver_metrics = ArchiverMetrics(registry)
    messaging_metrics = MessagingMetrics(registry, event_types=[e.event_type for e in USER_EVENTS])

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = redis_connect(
            settings.redis_target(), max_connections=settings.redis_max_connections
        )
        archive = Archive(
            redis, prefix=settings.redis_prefix, durability=settings.redis_durability()
        )
        connection = AmqpConnection(
            settings.amqp_url, client_name=SERVICE, heartbeat=settings.amqp_heartbeat_seconds
        )
        workers = Workers(settings, archive, connection, archiver_metrics, messaging_metrics)
        app.state.settings = settings
        app.state.archive = archive
        app.state.workers = workers
        starting = asyncio.create_task(workers.start())
        housekeeping = asyncio.create_task(workers.housekeeping())
        try:
            yield
        finally:
            workers.stopping.set()
            await cancel_and_wait([starting, housekeeping])
            await workers.stop()
            await connection.close()
            await redis.aclose()

    async def readiness() -> Mapping[str, Any]:
        workers: Workers = app.state.workers
        try:
            redis_ok = bool(await workers.archive.redis.ping())
        except Exception as exc:
            log.warning("redis_ping_failed", error=type(exc).__name__)
            redis_ok = False
        connection = workers.connection
        consuming = workers.started.is_set() and connection.is_connected
        report: dict[str, Any] = {
            "ready": redis_ok and consuming,
            "redis": "ok" if redis_ok else "down",
            "broker": broker_state(connection),
            "consuming": consuming,
        }
        if connection.problem:
            report["broker_problem"] = connection.problem
        return report

    app = FastAPI(
        title="Courier dlq-archiver",
        version="0.1.0",
        description="Every dead letter with its diagnosis: list, group, replay, purge.",
        lifespan=lifespan,
        telemetry=NO_NATIVE_TELEMETRY,
    )
    install_problem_handlers(app, unavailable=STORAGE_ERRORS)
    app.include_router(dead_letters.router)
    app.include_router(health_router(readiness=readiness, registry=registry))
    # No span per ASGI receive/send message: they are noise in the trace and cost two spans
    # per request on the hot path.
    FastAPIInstrumentor.instrument_app(
        app, excluded_urls="healthz,readyz,metrics", exclude_spans=["receive", "send"]
    )

    app.add_middleware(HttpMetricsMiddleware, metrics=http_metrics)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=64 * 1024)
    return app


def run() -> None:
    """Console entry point: ``dlq-archiver``."""
    settings = Settings()  # admin_token comes from the environment
    run_service(SERVICE, settings, lambda: create_app(settings))
