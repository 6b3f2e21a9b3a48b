"""One function builds a Courier service: :func:`service_app`; :func:`run_service` runs it.

Every Courier process with a port is the same shape around its own parts: a Prometheus
registry and ``/metrics``, RFC 9457 problem bodies (storage errors answered 503), the body
size limit, request metrics, the access line and request traces, ``/healthz`` and ``/readyz``,
and a lifespan that opens Redis and the broker, starts the service's workers in the
background and drains them on SIGTERM. A service's ``main.py`` names its parts (routers, a
``build`` that makes its workers from the opened connections, readiness details) and calls
this; where each concern lives is in docs/architecture.md.

Start-up never blocks serving: the probes answer from the first moment, ``/readyz`` 503 with
the reason until the workers run (a broker that refuses our vhost or credentials is waited
out and reported, never crashed on). A worker that cannot start — the broker's topology
contradicts ours (:class:`~courier_common.messaging.TopologyMismatchError`, which needs an
operator) or anything else — ends the process: one critical log line, the graceful shutdown,
exit status 1. Never a silently dead worker behind a live ``/healthz``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import APIRouter, FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from courier_common.backoff import Backoff
from courier_common.http import (
    NO_NATIVE_TELEMETRY,
    BodySizeLimitMiddleware,
    HttpMetrics,
    HttpMetricsMiddleware,
    StorageErrors,
    health_router,
    install_problem_handlers,
    serve,
)
from courier_common.logging import configure_logging, get_logger
from courier_common.messaging import AmqpConnection, Topology, TopologyMismatchError
from courier_common.messaging.connection import broker_state
from courier_common.messaging.topology import declare_topology
from courier_common.redis import STORAGE_ERRORS
from courier_common.redis import connect as redis_connect
from courier_common.settings import CourierSettings
from courier_common.tasks import cancel_and_wait, pause
from courier_common.tracing import init_tracing, shutdown_tracing

log = get_logger(__name__)

#: The request body limit of a service that does not set its own.
DEFAULT_MAX_BODY_BYTES = 64 * 1024
#: Exit status of a process whose workers could not start (a plain SIGTERM stop exits 0).
EXIT_START_FAILED = 1


class Worker(Protocol):
    """Something a service runs beside its HTTP port: a consumer, a relay, a loop.

    ``start`` returns once it runs (a consumer consuming, a loop scheduled); ``stop`` ends it
    within ``timeout``, finishing what it holds. Workers start in order and stop together.
    """

    async def start(self) -> None: ...

    async def stop(self, timeout: float) -> object: ...


@dataclass(frozen=True)
class Parts:
    """What a service's ``build`` returns: its workers, and what its routes and probes read.

    * ``topology``: declared once the broker answers, before the first worker starts; None
      for a service whose workers declare their own (the outbox relay, on every connection).
    * ``state``: set on ``app.state`` for the routes' dependencies.
    * ``report``: extra ``/readyz`` details (in-flight counts, whether a relay is on).
    * ``consumes``: readiness needs the workers running on a live broker connection; a
      service that only publishes through an outbox is ready without the broker.
    """

    workers: Sequence[Worker] = ()
    topology: Topology | None = None
    state: Mapping[str, object] = field(default_factory=dict)
    report: Callable[[], Mapping[str, Any]] | None = None
    consumes: bool = True


class _Process:
    """The running service: its connections, its workers, and how it ends when they fail."""

    def __init__(self, name: str, redis: Redis, connection: AmqpConnection) -> None:
        self.name = name
        self.redis = redis
        self.connection = connection
        self.parts = Parts()
        self.running: list[Worker] = []
        self.started = asyncio.Event()
        self.exit_status = 0

    def fail(self, event: str, exc: BaseException, *, traceback: bool = False) -> None:
        """Log ``event`` as critical and stop the process gracefully, exit status 1."""
        if traceback:
            log.critical(event, error=repr(exc), exc_info=exc)
        else:
            log.critical(event, error=str(exc))
        self.exit_status = EXIT_START_FAILED
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful stop, then the lifespan's

    async def start(self) -> None:
        try:
            if self.parts.topology is not None:
                await self.connection.connect(timeout=None)
                channel = await self.connection.channel()
                try:
                    await declare_topology(channel, self.parts.topology)
                finally:
                    await channel.close()
            for worker in self.parts.workers:
                await worker.start()
                self.running.append(worker)
        except TopologyMismatchError as exc:
            self.fail("topology_mismatch", exc)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.fail("worker_start_failed", exc, traceback=True)
            return
        self.started.set()

    async def stop(self, timeout: float) -> None:
        """Stop what started, all at once, each within ``timeout``."""
        await asyncio.gather(*(worker.stop(timeout) for worker in reversed(self.running)))

    async def readiness(self) -> Mapping[str, Any]:
        try:
            redis_ok = bool(await self.redis.ping())
        except Exception as exc:
            log.warning("redis_ping_failed", error=type(exc).__name__)
            redis_ok = False
        connection = self.connection
        report: dict[str, Any] = {
            "ready": redis_ok,
            "redis": "ok" if redis_ok else "down",
            "broker": broker_state(connection),
        }
        if self.parts.consumes:
            consuming = self.started.is_set() and connection.is_connected
            report["ready"] = redis_ok and consuming
            report["consuming"] = consuming
        # A broker refusing our vhost or credentials (logged once as critical) is waited out
        # and said here; an outbox service stays ready meanwhile, buffering.
        if connection.problem:
            report["broker_problem"] = connection.problem
        if self.parts.report is not None:
            report.update(self.parts.report())
        return report


@dataclass(frozen=True)
class Resources:
    """What a service's ``build`` gets: the opened connections, and a way to run loops."""

    settings: CourierSettings
    registry: CollectorRegistry
    redis: Redis
    connection: AmqpConnection
    _process: _Process

    def background(
        self,
        name: str,
        run: Callable[[], Awaitable[None]],
        *,
        on_stop: Callable[[], None] | None = None,
    ) -> BackgroundTask:
        """``run`` as a worker: restarted after a crash; a topology mismatch ends the process."""
        return BackgroundTask(name, run, on_stop=on_stop, fail=self._process.fail)


class BackgroundTask:
    """A long-running coroutine as a :class:`Worker`, kept alive until it is stopped.

    ``run`` returning ends the task; raising restarts it after a backoff (1 s doubling to
    30 s, from 1 s again once a run lasted longer than that). A cancellation that is not our
    stop counts as a crash: aiormq cancels what it awaited when it drops a hung connection.
    ``on_stop`` tells ``run`` to return (a loop's own stop flag); whatever still runs after
    the stop's timeout is cancelled.
    """

    def __init__(
        self,
        name: str,
        run: Callable[[], Awaitable[None]],
        *,
        on_stop: Callable[[], None] | None,
        fail: Callable[[str, BaseException], None],
    ) -> None:
        self.name = name
        self._run = run
        self._on_stop = on_stop
        self._fail = fail
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=self.name)

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(initial=1.0, maximum=30.0)
        while not self._stopping.is_set():
            began = loop.time()
            try:
                await self._run()
                return
            except TopologyMismatchError as exc:
                self._fail("topology_mismatch", exc)
                return
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is None or current.cancelling() or self._stopping.is_set():
                    raise
                log.exception("background_task_crashed", task=self.name)
            except Exception:
                log.exception("background_task_crashed", task=self.name)
            if loop.time() - began > backoff.maximum:
                backoff.reset()
            await pause(self._stopping, backoff.next())

    async def stop(self, timeout: float) -> None:
        self._stopping.set()
        if self._on_stop is not None:
            self._on_stop()
        if self._task is None or self._task.done():
            return
        done, _ = await asyncio.wait([self._task], timeout=timeout)
        if not done:
            log.warning("background_task_stop_timeout", task=self.name, timeout_s=timeout)
            await cancel_and_wait([self._task])


def service_app(
    name: str,
    settings: CourierSettings,
    *,
    title: str,
    description: str = "",
    registry: CollectorRegistry,
    build: Callable[[Resources], AbstractAsyncContextManager[Parts]],
    routers: Sequence[APIRouter] = (),
    storage_errors: StorageErrors = STORAGE_ERRORS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    redis_options: Mapping[str, Any] | None = None,
) -> FastAPI:
    """The ASGI app of Courier service ``name``; building it does no I/O.

    ``registry`` holds the service's own metrics (made before, so ``/metrics`` lists them
    from the start); the HTTP ones join it here. ``build`` is an async context manager that
    makes the service's workers from :class:`Resources` and closes what it opened itself
    (an HTTP client, SMTP connections) on exit; Redis and the broker connection are closed
    after it. ``storage_errors`` answer 503 "storage unavailable" wherever a route meets
    them. ``redis_options`` go to :func:`courier_common.redis.connect`.
    """
    http_metrics = HttpMetrics(registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            redis = redis_connect(
                settings.redis_target(),
                max_connections=settings.redis_max_connections,
                **(redis_options or {}),
            )
            stack.push_async_callback(redis.aclose)
            connection = AmqpConnection(
                settings.amqp_url, client_name=name, heartbeat=settings.amqp_heartbeat_seconds
            )
            stack.push_async_callback(connection.close)
            process = _Process(name, redis, connection)
            app.state.courier = process
            resources = Resources(settings, registry, redis, connection, process)
            process.parts = parts = await stack.enter_async_context(build(resources))
            for key, value in parts.state.items():
                setattr(app.state, key, value)
            starting = asyncio.create_task(process.start(), name=f"{name}-start")
            try:
                yield
            finally:
                await cancel_and_wait([starting])
                await process.stop(settings.drain_timeout_seconds)

    async def readiness() -> Mapping[str, Any]:
        process: _Process = app.state.courier
        return await process.readiness()

    app = FastAPI(
        title=title,
        version="0.1.0",
        description=description,
        lifespan=lifespan,
        telemetry=NO_NATIVE_TELEMETRY,
    )
    install_problem_handlers(app, unavailable=storage_errors)
    for router in routers:
        app.include_router(router)
    app.include_router(health_router(readiness=readiness, registry=registry))
    # No span per ASGI receive/send message: they are noise in the trace and cost two spans
    # per request on the hot path.
    FastAPIInstrumentor.instrument_app(
        app, excluded_urls="healthz,readyz,metrics", exclude_spans=["receive", "send"]
    )
    app.add_middleware(HttpMetricsMiddleware, metrics=http_metrics)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=max_body_bytes)
    return app


def run_service(name: str, settings: CourierSettings, create_app: Callable[[], FastAPI]) -> None:
    """A service's console entry point: logging, tracing, serve until SIGTERM, exit status.

    Exits 0 after a SIGTERM stop, 1 when the workers could not start (see the module).
    """
    configure_logging(level=settings.log_level, fmt=settings.log_format, service=name)
    provider = init_tracing(name)
    app = create_app()
    try:
        serve(app, host=settings.http_host, port=settings.http_port, log_level=settings.log_level)
    finally:
        shutdown_tracing(provider)
    process: _Process | None = getattr(app.state, "courier", None)
    if process is not None and process.exit_status:
        sys.exit(process.exit_status)
