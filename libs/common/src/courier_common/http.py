"""The HTTP plumbing every Courier service with a port shares.

user-service and dlq-archiver serve a business API; notification-service only serves probes and
metrics. All three answer errors the same way, bound request bodies the same way, count and log
requests the same way and shut down the same way, so that a client, a fuzzer, a dashboard and an
operator each see one behaviour instead of three. Services hold routes and business logic only.

What is here, and why each piece is shaped the way it is:

* **Problem details (RFC 9457).** Every error body is ``application/problem+json``: route code
  raises `ProblemError`, and `install_problem_handlers` turns FastAPI's and Starlette's own
  errors (404, 405, validation, malformed JSON, crashes) into the same shape. Error bodies never
  echo what the client sent — a validation error about an email field must not put the email
  (or a 10,000-character value) back on the wire or into a proxy's log — and a crash never leaks
  exception text.
* **Pure ASGI middleware.** `BodySizeLimitMiddleware` and `HttpMetricsMiddleware` are plain ASGI
  callables, not ``BaseHTTPMiddleware``: that one runs the app in another task, which breaks
  streaming responses and hides contextvars (structlog's bound context, the OTel span) set by
  the app from code after it.
* **Bounded metrics and logs.** Requests are labelled by the matched route's path *template*
  (``/v1/users/{user_id}``) and a fixed set of methods; anything that matched no route is
  ``unmatched``, so a scanner trying random URLs cannot create new series. The one log line per
  request carries the same fields, never the raw path or query string (``?email=...``).
* **Probes.** `health_router` gives ``/healthz`` (liveness), ``/readyz`` (dependencies answer)
  and ``/metrics``, hidden from the OpenAPI schema so API fuzzing stays on the business API.
* **Serving.** `serve` runs uvicorn without letting it touch the logging configuration.

Typical wiring (the order of ``add_middleware`` calls matters: the last one added is outermost)::

    app = FastAPI(lifespan=lifespan, telemetry=NO_NATIVE_TELEMETRY)
    install_problem_handlers(app)
    app.include_router(health_router(readiness=check_dependencies, registry=registry))
    app.include_router(users_router)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=64 * 1024)
    app.add_middleware(HttpMetricsMiddleware, metrics=HttpMetrics(registry))
    serve(app, host=settings.http_host, port=settings.http_port, log_level=settings.log_level)
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any, Final

import redis.exceptions
import uvicorn
from fastapi import APIRouter, FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.telemetry import TelemetryConfig
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from courier_common.logging import configure_logging, get_logger
from courier_common.pii import scrub_text
from courier_common.redis import NotReplicatedError, is_unavailable
from courier_common.settings import CourierSettings
from courier_common.tracing import init_tracing, shutdown_tracing

__all__ = [
    "GRACEFUL_SHUTDOWN_SECONDS",
    "HTTP_BUCKETS",
    "NO_NATIVE_TELEMETRY",
    "PROBE_PATHS",
    "PROBLEM_JSON",
    "READINESS_TIMEOUT_SECONDS",
    "STANDARD_METHODS",
    "UNMATCHED_ROUTE",
    "BodySizeLimitMiddleware",
    "HttpMetrics",
    "HttpMetricsMiddleware",
    "ProblemError",
    "health_router",
    "install_problem_handlers",
    "problem_response",
    "serve",
]


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

#: The media type of every error body (RFC 9457).
PROBLEM_JSON: Final = "application/problem+json"

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
#: How long ``/readyz`` waits for the readiness callable before calling the service not ready.
#: Kubernetes' default probe timeout is 1 s; set ``timeoutSeconds`` above this in the chart.
READINESS_TIMEOUT_SECONDS: Final = 2.0
#: On SIGTERM, how long in-flight requests get before uvicorn cancels them. Keep it below the
#: pod's terminationGracePeriodSeconds, leaving room for the lifespan shutdown after it.
GRACEFUL_SHUTDOWN_SECONDS: Final = 20

# The standard members of a problem body; extension members may not overwrite them, so the body
# can never contradict the HTTP status line.
_PROBLEM_MEMBERS: Final = frozenset({"type", "title", "status", "detail", "instance"})
# Validation error bounds: a body with thousands of bad items must not produce a megabyte answer,
# and a user-supplied dict key that shows up in ``loc`` is not echoed at length.
_MAX_VALIDATION_ERRORS: Final = 50
_MAX_LOC_ITEM_CHARS: Final = 64
_MAX_MESSAGE_CHARS: Final = 300
# Shorter inputs are not cut out of messages: replacing "a" would mangle the text, not redact it.
_MIN_REDACTED_INPUT_CHARS: Final = 3
_REDACTED: Final = "[redacted]"
# Status label for a request that ended without any response (the client went away first);
# nginx's "client closed request", which operators already recognise.
_NO_RESPONSE_STATUS: Final = 499

_log = get_logger(__name__)


# --------------------------------------------------------------------------------------------
# Problem details
# --------------------------------------------------------------------------------------------


def _phrase(status: int) -> str:
    """The standard reason phrase: RFC 9457 wants it as the title when the type is about:blank."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class ProblemError(Exception):
    """Raise from route code (or a dependency) to answer with a problem-details body.

    Business code says what went wrong in HTTP terms and nothing else; the handler installed by
    `install_problem_handlers` renders it, so every service's errors look alike. ``type`` is a
    URI naming the kind of problem (keep ``about:blank`` and use the status phrase as ``title``
    when the status code says it all); ``extra`` holds extension members such as
    ``{"user_id": ...}``; ``headers`` are added to the response (``Retry-After``,
    ``WWW-Authenticate``). Never put request input you did not generate yourself in ``detail``.
    """

    def __init__(
        self,
        status: int,
        title: str,
        detail: str | None = None,
        *,
        type: str = "about:blank",
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {title}" + (f": {detail}" if detail else ""))
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type
        self.extra: dict[str, Any] = dict(extra or {})
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The problem body this error renders to (e.g. to store it for a replay)."""
        return problem_body(self.status, self.title, self.detail, type=self.type, extra=self.extra)


class ValidationIssue(BaseModel):
    """One reason a request was refused, without the submitted value."""

    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """RFC 9457 problem details, as every Courier error is answered (for OpenAPI)."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[ValidationIssue] | None = None


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting problem+json answers for these statuses."""
    schema = {"$ref": "#/components/schemas/Problem"}
    return {
        status: {
            "model": Problem,
            "description": _phrase(status),
            "content": {PROBLEM_JSON: {"schema": schema}},
        }
        for status in statuses
    }


def problem_body(
    status: int,
    title: str,
    detail: str | None = None,
    *,
    type: str = "about:blank",
    instance: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The RFC 9457 body ``{type, title, status, detail, instance, ...extra}``.

    None members are left out. Extension members named like a standard member are dropped
    rather than allowed to overwrite it: a body whose ``status`` disagrees with the status line
    would mislead every client. ``extra`` values go through FastAPI's JSON encoder.
    """
    body: dict[str, Any] = {"type": type, "title": title, "status": int(status)}
    if detail is not None:
        body["detail"] = detail
    if instance is not None:
        body["instance"] = instance
    if extra:
        encoded: dict[str, Any] = jsonable_encoder(
            {key: value for key, value in extra.items() if key not in _PROBLEM_MEMBERS}
        )
        body.update(encoded)
    return body


def problem_response(
    status: int,
    title: str,
    detail: str | None = None,
    *,
    type: str = "about:blank",
    instance: str | None = None,
    extra: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """An ``application/problem+json`` response with :func:`problem_body`."""
    body = problem_body(status, title, detail, type=type, instance=instance, extra=extra)
    return JSONResponse(
        body,
        status_code=int(status),
        headers=dict(headers) if headers else None,
        media_type=PROBLEM_JSON,
    )


def _redact_message(message: str, raw_input: object) -> str:
    """Cut the offending input out of a validation message, then mask emails and phones.

    Pydantic's own messages describe the rule ("String should have at most 100 characters"),
    but some quote the value (a union tag, a custom validator's ``ValueError(f"{v} ...")``).
    """
    if isinstance(raw_input, str) and len(raw_input) >= _MIN_REDACTED_INPUT_CHARS:
        message = message.replace(raw_input, _REDACTED)
    message = scrub_text(message)
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[: _MAX_MESSAGE_CHARS - 1] + "…"
    return message


def _safe_loc_item(item: object) -> str | int:
    """A ``loc`` element: field names come from code, but dict keys come from the client."""
    if isinstance(item, int) and not isinstance(item, bool):
        return item
    text = scrub_text(str(item))
    if len(text) > _MAX_LOC_ITEM_CHARS:
        text = text[: _MAX_LOC_ITEM_CHARS - 1] + "…"
    return text


def _safe_validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic errors reduced to ``loc``/``msg``/``type``: ``input`` and ``ctx`` hold user data."""
    safe: list[dict[str, Any]] = []
    for error in errors[:_MAX_VALIDATION_ERRORS]:
        if not isinstance(error, Mapping):
            continue
        loc = error.get("loc", ())
        safe.append(
            {
                "loc": [_safe_loc_item(item) for item in loc] if isinstance(loc, Iterable) else [],
                "msg": _redact_message(str(error.get("msg", "")), error.get("input")),
                "type": str(error.get("type", "value_error")),
            }
        )
    return safe


async def _handle_problem_error(_request: Request, exc: Exception) -> Response:
    if not isinstance(exc, ProblemError):  # pragma: no cover - registered for ProblemError only
        raise exc
    return problem_response(
        exc.status,
        exc.title,
        exc.detail,
        type=exc.type,
        extra=exc.extra,
        headers=exc.headers,
    )


async def _handle_http_exception(_request: Request, exc: Exception) -> Response:
    """Starlette's and FastAPI's HTTPException (404, 405 with Allow, 401 with WWW-Authenticate)."""
    if not isinstance(exc, StarletteHTTPException):  # pragma: no cover - registered for it only
        raise exc
    status = exc.status_code
    headers = dict(exc.headers) if exc.headers else None
    if status in (HTTPStatus.NO_CONTENT, HTTPStatus.NOT_MODIFIED):
        # These statuses must not carry a body.
        return Response(status_code=status, headers=headers)
    title = _phrase(status)
    detail: object = exc.detail
    extra: dict[str, Any] | None = None
    if isinstance(detail, str):
        # Starlette fills detail with the phrase when none was given; saying it twice is noise.
        text: str | None = detail if detail != title else None
    else:
        # FastAPI allows any JSON-able detail; problem "detail" is a string, so move it aside.
        text, extra = None, {"errors": detail}
    return problem_response(status, title, text, extra=extra, headers=headers)


async def _handle_validation_error(_request: Request, exc: Exception) -> Response:
    """422 with where and why, never what: ``input``/``ctx`` (the client's own data) are dropped.

    A body that is not JSON at all is a 400 with the parser's reason ("Expecting value") and its
    position, which describe the syntax without quoting the document.
    """
    if not isinstance(exc, RequestValidationError):  # pragma: no cover - registered for it only
        raise exc
    errors = exc.errors()
    for error in errors:
        if isinstance(error, Mapping) and error.get("type") == "json_invalid":
            ctx = error.get("ctx")
            reason = ctx.get("error") if isinstance(ctx, Mapping) else None
            loc = error.get("loc", ())
            position = loc[-1] if isinstance(loc, Sequence) and loc else None
            detail = "Request body is not valid JSON"
            if isinstance(reason, str):
                detail += f": {scrub_text(reason)[:_MAX_MESSAGE_CHARS]}"
            if isinstance(position, int):
                detail += f" (at position {position})"
            return problem_response(HTTPStatus.BAD_REQUEST, _phrase(400), detail + ".")
    safe = _safe_validation_errors(errors)
    extra: dict[str, Any] = {"errors": safe}
    if len(errors) > len(safe):
        extra["errors_truncated"] = True
    return problem_response(
        HTTPStatus.UNPROCESSABLE_ENTITY,
        _phrase(422),
        "The request did not pass validation; see errors.",
        extra=extra,
    )


def _internal_error_response() -> JSONResponse:
    return problem_response(
        HTTPStatus.INTERNAL_SERVER_ERROR,
        _phrase(500),
        "The server could not handle this request; the error has been logged.",
    )


async def _handle_outer_exception(_request: Request, _exc: Exception) -> Response:
    """Fallback for exceptions raised outside `_UnhandledErrorMiddleware` (in other middleware).

    Starlette's ServerErrorMiddleware re-raises after answering, and uvicorn then logs the
    exception with its traceback; logging here as well would log it twice.
    """
    return _internal_error_response()


class _UnhandledErrorMiddleware:
    """Answer any exception the exception handlers did not take with a generic 500, logged once.

    An exception handler for ``Exception`` would run in Starlette's ServerErrorMiddleware, which
    re-raises after answering so that uvicorn logs the exception *again* in its own words. This
    middleware sits just outside the exception handlers instead, logs the exception once through
    Courier's logger (route template, no raw path) and does not re-raise. Middleware added by the
    services sits outside it and sees an ordinary 500.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except ClientDisconnect:
            # The client went away while we read its body (or BodySizeLimitMiddleware cut it
            # off and already answered): nobody is left to answer and nothing is broken.
            return
        except Exception:
            _log.exception(
                "unhandled_exception",
                method=_method_label(scope),
                route=_route_template(scope),
                response_started=started,
            )
            if not started:
                await _internal_error_response()(scope, receive, send)
            # If the response had started, the server notices it never finished and closes the
            # connection, which is the only honest signal left to the client.


async def _handle_storage_down(request: Request, exc: Exception) -> Response:
    """Redis unreachable, too slow or not replicating: a 503 the client may retry, not a 500.

    For a write the outcome is unknown: Redis may have applied it and stopped before it
    answered (the fault suite sees it when Redis is killed under load), or applied it without
    the replicas confirming it in time (`NotReplicatedError`: a failover may take it back, or
    it may stay). The detail says so, and how to find out. A Redis error reply that is not
    about availability (see `courier_common.redis.is_unavailable`) is a bug: re-raised, so it
    is logged once and answered 500.
    """
    if not is_unavailable(exc):
        raise exc
    _log.warning("storage_unavailable", error=type(exc).__name__)
    write = request.method not in ("GET", "HEAD", "OPTIONS")
    extra: dict[str, Any] | None = None
    if isinstance(exc, NotReplicatedError):
        detail = "The data store's replicas did not confirm the change in time; try again."
        extra = {"replicas_required": exc.required, "replicas_confirmed": exc.confirmed}
        if write:
            detail += (
                " The change may have been applied: it is on the primary and may stay or be"
                " undone by a failover. Retry with the same Idempotency-Key, or read the"
                " resource, to learn its outcome."
            )
    else:
        detail = "The data store did not answer in time; try again shortly."
        if write:
            detail += (
                " The change may have been applied before it stopped answering: retry with"
                " the same Idempotency-Key, or read the resource, to learn its outcome."
            )
    return problem_response(
        503, "Storage unavailable", detail, extra=extra, headers={"Retry-After": "5"}
    )


def install_problem_handlers(app: FastAPI) -> None:
    """Make every error this app answers an RFC 9457 problem, without echoing client input.

    Covers `ProblemError`; Starlette/FastAPI ``HTTPException`` (404 for an unknown route, 405
    with its ``Allow`` header, anything raised with headers); request validation (422 with
    ``errors: [{loc, msg, type}]``, no input values); a body that is not JSON (400); and any
    other exception (500 with a generic detail, logged once with its traceback). The last one is
    a small ASGI middleware placed innermost among the user middleware, so call this before the
    app serves its first request, like ``add_middleware``.
    """
    if app.middleware_stack is not None:
        raise RuntimeError("install_problem_handlers must run before the app starts")
    app.add_exception_handler(ProblemError, _handle_problem_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_exception)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(redis.exceptions.ConnectionError, _handle_storage_down)
    app.add_exception_handler(redis.exceptions.TimeoutError, _handle_storage_down)
    app.add_exception_handler(redis.exceptions.ResponseError, _handle_storage_down)
    app.add_exception_handler(Exception, _handle_outer_exception)
    app.user_middleware.append(Middleware(_UnhandledErrorMiddleware))


# --------------------------------------------------------------------------------------------
# Request body limit
# --------------------------------------------------------------------------------------------


def _declared_length(scope: Scope) -> int | None:
    """The request's Content-Length; None when absent; ValueError when unusable.

    Several Content-Length headers are accepted only when they agree (RFC 9110 §8.6).
    """
    values = {
        value.strip()
        for name, value in scope.get("headers", ())
        if name.lower() == b"content-length"
    }
    if not values:
        return None
    if len(values) > 1:
        raise ValueError("conflicting Content-Length headers")
    (value,) = values
    if not value.isdigit():
        raise ValueError("Content-Length is not a non-negative integer")
    return int(value)


class BodySizeLimitMiddleware:
    """Refuse request bodies larger than ``max_body_bytes`` with 413, before they fill memory.

    A declared Content-Length over the limit is answered at once, without reading a byte of the
    body (a client sending ``Expect: 100-continue`` never uploads it). A body without a length
    (chunked, streamed) is counted as the app reads it: when it crosses the limit the client
    gets the 413, and the app sees the client disconnect, so it stops reading; whatever the app
    sends after that is dropped. If the app had already started its response, no 413 can be
    sent any more: the body is cut off all the same. An unparsable Content-Length is a 400.
    Error responses carry ``Connection: close``: the unread rest of the body is still on the
    connection, and closing it is simpler and safer than draining it.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        if max_body_bytes < 0:
            raise ValueError("max_body_bytes must be >= 0")
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _too_large(self) -> Response:
        return problem_response(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            _phrase(413),
            f"The request body exceeds the limit of {self.max_body_bytes} bytes.",
            extra={"max_body_bytes": self.max_body_bytes},
            headers={"Connection": "close"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            declared = _declared_length(scope)
        except ValueError as exc:
            response: Response = problem_response(
                HTTPStatus.BAD_REQUEST,
                _phrase(400),
                f"{exc}.",
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return
        if declared is not None and declared > self.max_body_bytes:
            await self._too_large()(scope, receive, send)
            return

        received = 0
        cut_off = False
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if cut_off:
                return  # the client already has its 413, or the exchange was cut short
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        async def receive_wrapper() -> Message:
            nonlocal received, cut_off
            if cut_off:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    cut_off = True
                    if not started:
                        await self._too_large()(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        await self.app(scope, receive_wrapper, send_wrapper)


# --------------------------------------------------------------------------------------------
# RED metrics and the request log line
# --------------------------------------------------------------------------------------------


def _method_label(scope: Scope) -> str:
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


def _route_template(scope: Scope) -> str:
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
        method = _method_label(scope)
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
        route = _route_template(scope)
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


# --------------------------------------------------------------------------------------------
# Probes and scrape endpoint
# --------------------------------------------------------------------------------------------


async def _check_readiness(
    readiness: Callable[[], Awaitable[Mapping[str, Any]]], timeout: float
) -> tuple[bool, dict[str, Any]]:
    """Run the readiness callable; a raise, a timeout or a malformed answer means not ready."""
    try:
        async with asyncio.timeout(timeout):
            report = await readiness()
    except TimeoutError:
        _log.warning("readiness_timeout", timeout_seconds=timeout)
        return False, {"ready": False, "reason": f"readiness check timed out after {timeout:g}s"}
    except Exception as exc:
        _log.warning("readiness_failed", exc_info=exc)
        return False, {
            "ready": False,
            "reason": f"readiness check raised {type(exc).__name__}",
        }
    if not isinstance(report, Mapping):
        return False, {
            "ready": False,
            "reason": f"readiness check returned {type(report).__name__}, not a mapping",
        }
    body: dict[str, Any] = jsonable_encoder(dict(report))
    ready = report.get("ready") is True
    body["ready"] = ready
    return ready, body


def health_router(
    *,
    readiness: Callable[[], Awaitable[Mapping[str, Any]]],
    registry: CollectorRegistry,
    readiness_timeout_seconds: float = READINESS_TIMEOUT_SECONDS,
) -> APIRouter:
    """``/healthz``, ``/readyz`` and ``/metrics`` for one service, outside its OpenAPI schema.

    * ``GET /healthz`` answers 200 ``{"status": "ok"}`` while the process can serve at all; it
      checks no dependency, so a Redis outage never makes Kubernetes restart healthy pods.
    * ``GET /readyz`` awaits *readiness*, which returns ``{"ready": bool, ...details per
      dependency}``: 200 with that body when ``ready`` is ``True``, 503 otherwise. A callable that
      raises or takes longer than *readiness_timeout_seconds* is not ready, and the body says
      why (the exception type only: its text may hold a connection URL; the log has it all).
      The timeout relies on cancellation, so the callable must not block the event loop.
    * ``GET /metrics`` is *registry* in the Prometheus text format.

    Probe answers are ``Cache-Control: no-store``: a cached "ready" is a lie.
    """
    router = APIRouter()
    no_store = {"Cache-Control": "no-store"}

    @router.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"}, headers=no_store)

    @router.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        ready, body = await _check_readiness(readiness, readiness_timeout_seconds)
        status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
        return JSONResponse(body, status_code=int(status), headers=no_store)

    @router.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST, headers=no_store)

    return router


# --------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------


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


def run_service(name: str, settings: CourierSettings, create_app: Callable[[], ASGIApp]) -> None:
    """A service's console entry point: logging, tracing, then serve until SIGTERM."""
    configure_logging(level=settings.log_level, fmt=settings.log_format, service=name)
    provider = init_tracing(name)
    try:
        serve(
            create_app(),
            host=settings.http_host,
            port=settings.http_port,
            log_level=settings.log_level,
        )
    finally:
        shutdown_tracing(provider)


class _GracefulServer(uvicorn.Server):
    """uvicorn, except that a graceful stop on SIGTERM returns normally (exit code 0)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            yield
            self._captured_signals = [
                sig for sig in self._captured_signals if sig != signal.SIGTERM
            ]
