"""user-service entry point: ``create_app(settings)`` for tests, ``run()`` for the console."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Mapping
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
from courier_common.messaging import AmqpConnection, Topology, TopologyMismatchError
from courier_common.messaging.connection import broker_state
from courier_common.metrics import MessagingMetrics, service_registry
from courier_common.redis import STORAGE_ERRORS
from courier_common.redis import connect as redis_connect
from user_service.api import contract, users
from user_service.config import Settings
from user_service.outbox import OutboxMetrics, OutboxRelay
from user_service.store import UserStore

log = get_logger(__name__)
SERVICE = "user-service"


async def _supervise(relay: OutboxRelay) -> None:
    """Keep the relay running; a topology mismatch is fatal (it needs an operator)."""
    while True:
        try:
            await relay.run()
            return
        except TopologyMismatchError as exc:
            log.critical("outbox_relay_fatal", error=str(exc))
            os.kill(os.getpid(), signal.SIGTERM)
            return
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is None or current.cancelling():
                raise  # shutting down
            # A library cancelled something the relay awaited (aiormq does, dropping a hung
            # connection): that is a crash to recover from, not our stop.
            log.exception("outbox_relay_crashed")
            await asyncio.sleep(1)
        except Exception:
            log.exception("outbox_relay_crashed")
            await asyncio.sleep(1)


def create_app(settings: Settings, *, topology: Topology | None = None) -> FastAPI:
    """The ASGI app; connections open in its lifespan, so building it does no I/O."""
    registry = service_registry()
    http_metrics = HttpMetrics(registry)
    messaging_metrics = MessagingMetrics(registry, event_types=[e.event_type for e in USER_EVENTS])
    outbox_metrics = OutboxMetrics(registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = redis_connect(
            settings.redis_target(),
            max_connections=settings.redis_max_connections,
            socket_timeout=settings.outbox_block_ms / 1000 + 10,
        )
        durability = settings.redis_durability()
        store = UserStore(redis, prefix=settings.redis_prefix, durability=durability)
        connection = AmqpConnection(
            settings.amqp_url, client_name=SERVICE, heartbeat=settings.amqp_heartbeat_seconds
        )
        relay = OutboxRelay(
            redis=redis,
            stream=store.outbox_key,
            connection=connection,
            # The platform only: user-service publishes and does not know who consumes. An
            # event no consumer's queue is bound for yet is unroutable and waits in the outbox.
            topology=topology or Topology(initial_group_size=settings.quorum_initial_group_size),
            metrics=outbox_metrics,
            messaging_metrics=messaging_metrics,
            batch_size=settings.outbox_batch_size,
            block_ms=settings.outbox_block_ms,
            claim_idle_ms=settings.outbox_claim_idle_ms,
            retry_max_seconds=settings.outbox_retry_max_seconds,
            durability=durability,
        )
        app.state.settings = settings
        app.state.store = store
        app.state.relay = relay
        task = asyncio.create_task(_supervise(relay)) if settings.relay_enabled else None
        try:
            yield
        finally:
            relay.stop()
            if task is not None:
                try:
                    await asyncio.wait_for(task, 10)
                except TimeoutError:
                    log.warning("outbox_relay_stop_timeout")
                with contextlib.suppress(asyncio.CancelledError):
                    task.cancel()
                    await task
            await connection.close()
            await redis.aclose()

    async def readiness() -> Mapping[str, Any]:
        store: UserStore = app.state.store
        relay: OutboxRelay = app.state.relay
        try:
            redis_ok = await store.ping()
        except Exception as exc:
            return {"ready": False, "redis": f"error: {type(exc).__name__}"}
        # The broker is reported, not required: the outbox buffers while it is away, and also
        # while the broker refuses the configured vhost or credentials (logged once as
        # critical; the relay retries until an operator fixes it, and nothing is lost).
        report: dict[str, Any] = {
            "ready": redis_ok,
            "redis": "ok" if redis_ok else "down",
            "broker": broker_state(relay.connection),
            "relay": "on" if settings.relay_enabled else "off",
        }
        if settings.relay_enabled and relay.connection.problem:
            report["broker_problem"] = relay.connection.problem
        return report

    app = FastAPI(
        title="Courier user-service",
        version="0.1.0",
        description="Register users; their events leave through a transactional outbox.",
        lifespan=lifespan,
        telemetry=NO_NATIVE_TELEMETRY,
    )
    install_problem_handlers(app, unavailable=STORAGE_ERRORS)
    app.include_router(users.router)
    app.include_router(contract.router)
    app.include_router(health_router(readiness=readiness, registry=registry))
    # No span per ASGI receive/send message: they are noise in the trace and cost two spans
    # per request on the hot path.
    FastAPIInstrumentor.instrument_app(
        app, excluded_urls="healthz,readyz,metrics", exclude_spans=["receive", "send"]
    )
    app.add_middleware(HttpMetricsMiddleware, metrics=http_metrics)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    return app


def run() -> None:
    """Console entry point: ``user-service``."""
    settings = Settings()
    run_service(SERVICE, settings, lambda: create_app(settings))
