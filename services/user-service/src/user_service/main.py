"""user-service: the HTTP API where users register, and the relay of its outbox.

Wiring only; the process's life (draining on SIGTERM, ending on a topology mismatch) is
`courier_common.service`'s. The broker is reported in ``/readyz``, not required: the outbox
keeps every event while the broker is away or refuses us, and the relay catches up.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from courier_common.events import USER_EVENTS
from courier_common.messaging import Topology
from courier_common.metrics import MessagingMetrics, service_registry
from courier_common.outbox import OutboxMetrics, OutboxRelay
from courier_common.service import Parts, Resources, run_service, service_app
from user_service.api import contract, users
from user_service.config import Settings
from user_service.store import UserStore

SERVICE = "user-service"


def create_app(settings: Settings, *, topology: Topology | None = None) -> FastAPI:
    """The ASGI app; connections open in its lifespan, so building it does no I/O."""
    registry = service_registry()
    messaging_metrics = MessagingMetrics(registry, event_types=[e.event_type for e in USER_EVENTS])
    outbox_metrics = OutboxMetrics(registry)

    @asynccontextmanager
    async def build(resources: Resources) -> AsyncIterator[Parts]:
        store = UserStore(
            resources.redis, prefix=settings.redis_prefix, durability=settings.redis_durability()
        )
        relay = OutboxRelay.from_settings(
            settings,
            redis=resources.redis,
            stream=store.outbox.stream,
            connection=resources.connection,
            # The platform only: user-service publishes and does not know who consumes. An
            # event no consumer's queue is bound for yet is unroutable and waits in the outbox.
            topology=topology or Topology(initial_group_size=settings.quorum_initial_group_size),
            metrics=outbox_metrics,
            messaging_metrics=messaging_metrics,
        )
        relaying = [resources.background("outbox_relay", relay.run, on_stop=relay.stop)]
        yield Parts(
            workers=relaying if settings.relay_enabled else [],
            state={"settings": settings, "store": store},
            report=lambda: {"relay": "on" if settings.relay_enabled else "off"},
            consumes=False,
        )

    return service_app(
        SERVICE,
        settings,
        title="Courier user-service",
        description="Register users; their events leave through a transactional outbox.",
        registry=registry,
        build=build,
        routers=[users.router, contract.router],
        max_body_bytes=settings.max_body_bytes,
        # XREADGROUP blocks for outbox_block_ms: the socket must wait longer than that.
        redis_options={"socket_timeout": settings.outbox_block_ms / 1000 + 10},
    )


def run() -> None:
    """Console entry point: ``user-service``."""
    settings = Settings()
    run_service(SERVICE, settings, lambda: create_app(settings))
