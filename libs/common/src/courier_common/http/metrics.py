"""RED metrics and the one log line per request, both bounded.

Requests are labelled by the matched route's path *template* (``/v1/users/{user_id}``) and a
fixed set of methods; anything that matched no route is ``unmatched``, so a scanner trying
random URLs cannot create new series. The one log line per request carries the same fields,
never the raw path or query string (``?email=...``).

`HttpMetricsMiddleware` is a plain ASGI callable, not ``BaseHTTPMiddleware``: that one runs the
app in another task, which breaks streaming responses and hides contextvars (structlog's bound
context, the OTel span) set by the app from code after it.
"""

from __future__ import annotations

import time
from http import HTTPStatus
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from courier_common.logging import get_logger

__all__ = [
    "HTTP_BUCKETS",
    "PROBE_PATHS",
    "STANDARD_METHODS",
    "UNMATCHED_ROUTE",
    "HttpMetrics",
    "HttpMetricsMiddleware",
    "method_label",
    "route_template",
]

#: Route label for requests that matched no route: 404s, scanners, early rejections.
UNMATCHED_ROUTE: Final = "unmatched"
#: Methods that get their own ``method`` label; anything else is counted as ``OTHER``.
STANDARD_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
#: Route templates that are counted but not logged: probes and scrapes would drown real traffic.
PROBE_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})
#: Request duration buckets: an API answering from Redis, up to a client's patience.
HTTP_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Status label for a request that ended without any response (the client went away first);
# nginx's "client closed request", which operators already recognise.
_NO_RESPONSE_STATUS: Final = 499


def method_label(scope: Scope) -> str:
    """The ``method`` label: one of `STANDARD_METHODS`, or ``OTHER``."""
    method = str(scope.get("method", "")).upper()
    return method if method in STANDARD_METHODS else "OTHER"


def _template_of(route: object) -> str | None:
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else None


def _match_template(scope: Scope) -> str | None:
    """Find the route a request *would* have hit, when something answered before routing.

    Used when no route ran — a 413 from BodySizeLimitMiddleware, say — so that the operator
    sees which endpoint the oversized uploads went to. Only routes the app defines can come out,
    so the label stays bounded. Best effort: any surprise means "unmatched".
    """
    routes = getattr(scope.get("app"), "routes", None)
    if not isinstance(routes, list):
        return None
    partial: BaseRoute | None = None
    try:
        for route in routes:
            if not isinstance(route, BaseRoute):
                continue
            match, _child_scope = route.matches(scope)
            if match is Match.FULL:
                return _template_of(route)
            if match is Match.PARTIAL and partial is None:
                partial = route
    except Exception:
        return None
    return _template_of(partial) if partial is not None else None


def route_template(scope: Scope) -> str:
    """The matched route's path template, read after the app ran.

    Starlette's router stores the matched route in ``scope["route"]`` (also a partial match,
    which is what answers 405), in the same scope dict every middleware shares. FastAPI's
    ``include_router`` copies routes with their full prefix, so the template is the whole path.
    A route inside a ``Mount`` reports its path relative to the mount.
    """
    return _template_of(scope.get("route")) or _match_template(scope) or UNMATCHED_ROUTE


class HttpMetrics:
    """RED metrics for an HTTP service, on an injected registry.

    Labels are bounded: ``method`` is one of `STANDARD_METHODS` or ``OTHER``, ``route`` a route
    template or ``unmatched``, ``status`` the numeric status code.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "courier_http_requests",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "courier_http_request_duration_seconds",
            "Time from receiving a request to the end of the app's handling of it.",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "courier_http_requests_in_flight",
            "HTTP requests being handled right now.",
            ["method"],
            registry=registry,
        )


class HttpMetricsMiddleware:
    """Count, time and log every HTTP request: one ``http_request`` line per request.

    The line holds ``method``, ``route`` (the template), ``status`` and ``duration_ms``; it never
    holds the raw path or query string, where clients put emails and tokens. Probe and scrape
    routes (`PROBE_PATHS`) are counted but not logged. A request whose app raised before
    answering counts as 500; one that ended with no response at all (the client left) as 499.
    Add it last (outermost) so it also sees what other middleware answered.
    """

    def __init__(
        self, app: ASGIApp, *, metrics: HttpMetrics, logger_name: str = "courier.http"
    ) -> None:
        self.app = app
        self._metrics = metrics
        self._log = get_logger(logger_name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = method_label(scope)
        status: int | None = None

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start" and status is None:
                status = int(message["status"])
            await send(message)

        in_flight = self._metrics.in_flight.labels(method=method)
        in_flight.inc()
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            if status is None:
                status = int(HTTPStatus.INTERNAL_SERVER_ERROR)
            raise
        finally:
            elapsed = time.perf_counter() - start
            in_flight.dec()
            self._record(scope, method, status, elapsed)

    def _record(self, scope: Scope, method: str, status: int | None, elapsed: float) -> None:
        route = route_template(scope)
        code = int(status) if status is not None else _NO_RESPONSE_STATUS
        self._metrics.requests.labels(method=method, route=route, status=str(code)).inc()
        self._metrics.duration.labels(method=method, route=route).observe(elapsed)
        if route not in PROBE_PATHS:
            self._log.info(
                "http_request",
                method=method,
                route=route,
                status=code,
                duration_ms=round(elapsed * 1000, 2),
            )
