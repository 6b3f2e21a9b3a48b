"""Serving a Courier app: uvicorn without its logging, a graceful SIGTERM, no native telemetry.

`serve` runs uvicorn without letting it touch the logging configuration, and returns normally when
SIGTERM stopped it. `NO_NATIVE_TELEMETRY` is what every app is built with.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Generator
from typing import Final

import uvicorn
from fastapi.telemetry import TelemetryConfig
from starlette.types import ASGIApp

__all__ = ["GRACEFUL_SHUTDOWN_SECONDS", "NO_NATIVE_TELEMETRY", "serve"]


#: ``FastAPI(telemetry=...)`` for every Courier app: FastAPI's own OpenTelemetry (on by default
#: since 0.16x whenever a tracer provider is set) switched off. Courier's HTTP spans come from
#: the OpenTelemetry ASGI instrumentation (``FastAPIInstrumentor``, with its excluded probe
#: URLs): with both, every request also paid FastAPI's telemetry wrapper, a service without
#: the instrumentation (notification-service) traced every ``/metrics`` scrape, and its
#: ``logs`` would send validation failures with their messages — the submitted values — to
#: any OpenTelemetry logger provider an environment configures.
NO_NATIVE_TELEMETRY: Final[TelemetryConfig] = {
    "tracing": False,
    "metrics": False,
    "logs": False,
    "operation_spans": False,
}

#: On SIGTERM, how long in-flight requests get before uvicorn cancels them. Keep it below the
#: pod's terminationGracePeriodSeconds, leaving room for the lifespan shutdown after it.
GRACEFUL_SHUTDOWN_SECONDS: Final = 20


def serve(app: ASGIApp, *, host: str, port: int, log_level: str) -> None:
    """Run *app* under uvicorn until SIGTERM or SIGINT; blocks.

    * ``log_config=None``: `courier_common.logging.configure_logging` has already routed
      uvicorn's loggers through Courier's handler; uvicorn's default dictConfig would replace
      that with its own handlers and format.
    * ``access_log=False``: `HttpMetricsMiddleware` writes the one line per request. uvicorn's
      access line would repeat it with the raw path and query string, emails included.
    * ``proxy_headers=False``: the client address is the peer's; ``X-Forwarded-For`` is
      client-controlled unless a known proxy sets it, and nothing here needs it.
    * ``server_header=False``: no need to tell scanners what we run.
    * ``lifespan="on"``: the app's lifespan opens and closes its connections; if it fails at
      startup the process exits instead of serving without them.

    On SIGTERM uvicorn stops accepting connections, closes idle keep-alive ones, gives
    in-flight requests up to `GRACEFUL_SHUTDOWN_SECONDS`, then runs the lifespan shutdown
    (closing Redis and AMQP connections) and returns. A SIGTERM-initiated stop is the normal
    way a pod ends, so the process then exits 0 (plain uvicorn re-raises the signal and dies
    of it); SIGINT is still re-raised, as a shell user expects of Ctrl-C.
    """
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level.lower(),
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        lifespan="on",
    )
    _GracefulServer(config).run()


class _GracefulServer(uvicorn.Server):
    """uvicorn, except that a graceful stop on SIGTERM returns normally (exit code 0)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            yield
            self._captured_signals = [
                sig for sig in self._captured_signals if sig != signal.SIGTERM
            ]
