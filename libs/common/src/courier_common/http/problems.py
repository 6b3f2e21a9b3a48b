"""Problem details (RFC 9457): every error a Courier service answers has one shape.

Every error body is ``application/problem+json``: route code raises `ProblemError`, and
`install_problem_handlers` turns FastAPI's and Starlette's own errors (404, 405, validation,
malformed JSON, crashes) into the same shape. Error bodies never echo what the client sent — a
validation error about an email field must not put the email (or a 10,000-character value) back
on the wire or into a proxy's log — and a crash never leaks exception text.

A data store that cannot serve is a 503 the client may retry, not a 500. Which exceptions mean
that is the store's to say, not this module's: the service passes them in as `StorageErrors`
(`courier_common.redis.STORAGE_ERRORS` for Redis).

Every path into the one shape is here (raised problems, the framework's errors, validation,
crashes, a store that is away), each in its own section, because they have to agree on it:
hence a module somewhat over the usual 400 lines.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any, Final, Protocol

from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from courier_common.http.metrics import method_label, route_template
from courier_common.logging import get_logger
from courier_common.pii import scrub_text

__all__ = [
    "PROBLEM_JSON",
    "Problem",
    "ProblemError",
    "StorageErrors",
    "ValidationIssue",
    "install_problem_handlers",
    "problem_body",
    "problem_response",
    "problem_responses",
]

#: The media type of every error body (RFC 9457).
PROBLEM_JSON: Final = "application/problem+json"

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

_log = get_logger(__name__)


def _phrase(status: int) -> str:
    """The standard reason phrase: RFC 9457 wants it as the title when the type is about:blank."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class ProblemError(Exception):
    """Raise from route code (or a dependency) to answer with a problem-details body.

    Business code says what went wrong in HTTP terms and nothing else; the handler installed by
    `install_problem_handlers` renders it (`problem_response`), so every service's errors look
    alike. ``type`` is a URI naming the kind of problem (keep ``about:blank`` and leave out
    ``title``, which then is the status phrase, when the status code says it all); ``extra``
    holds extension members such as ``{"user_id": ...}``; ``headers`` are added to the response
    (``Retry-After``, ``WWW-Authenticate``). Never put request input you did not generate
    yourself in ``detail``.
    """

    def __init__(
        self,
        status: int,
        title: str | None = None,
        detail: str | None = None,
        *,
        type: str = "about:blank",
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        title = _phrase(status) if title is None else title
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


# --------------------------------------------------------------------------------------------
# Bodies and responses
# --------------------------------------------------------------------------------------------


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


def problem_response(problem: ProblemError) -> JSONResponse:
    """*problem* as an ``application/problem+json`` response: its body, status and headers."""
    return JSONResponse(
        problem.body(),
        status_code=int(problem.status),
        headers=problem.headers or None,
        media_type=PROBLEM_JSON,
    )


# --------------------------------------------------------------------------------------------
# Validation errors, without what the client sent
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# FastAPI's and Starlette's own errors, and crashes
# --------------------------------------------------------------------------------------------


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
    return problem_response(ProblemError(status, title, text, extra=extra, headers=headers))


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
            return problem_response(ProblemError(HTTPStatus.BAD_REQUEST, detail=detail + "."))
    safe = _safe_validation_errors(errors)
    extra: dict[str, Any] = {"errors": safe}
    if len(errors) > len(safe):
        extra["errors_truncated"] = True
    return problem_response(
        ProblemError(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            detail="The request did not pass validation; see errors.",
            extra=extra,
        )
    )


def _internal_error_response() -> JSONResponse:
    return problem_response(
        ProblemError(
            HTTPStatus.INTERNAL_SERVER_ERROR,
            detail="The server could not handle this request; the error has been logged.",
        )
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
                method=method_label(scope),
                route=route_template(scope),
                response_started=started,
            )
            if not started:
                await _internal_error_response()(scope, receive, send)
            # If the response had started, the server notices it never finished and closes the
            # connection, which is the only honest signal left to the client.


# --------------------------------------------------------------------------------------------
# A data store that cannot serve
# --------------------------------------------------------------------------------------------


class StorageErrors(Protocol):
    """A data store's exceptions that mean "it cannot serve now": answered 503, not 500.

    Problem handling knows no data store: the module that talks to one describes its errors
    this way (`courier_common.redis.STORAGE_ERRORS`), and a service hands that to
    `install_problem_handlers`.
    """

    @property
    def types(self) -> Sequence[type[Exception]]:
        """The exception classes (subclasses included) the 503 handler is installed for."""
        ...

    def is_unavailable(self, exc: Exception) -> bool:
        """False for one of `types` that is a bug after all (a wrong command): answered 500."""
        ...

    def unconfirmed_replicas(self, exc: Exception) -> tuple[int, int] | None:
        """``(required, confirmed)`` when *exc* is a write too few replicas confirmed in time."""
        ...


def _storage_down_handler(
    storage: StorageErrors,
) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def handle_storage_down(request: Request, exc: Exception) -> Response:
        """The store unreachable, too slow or not replicating: a 503 the client may retry.

        For a write the outcome is unknown: the store may have applied it and stopped before it
        answered (the fault suite sees it when Redis is killed under load), or applied it
        without the replicas confirming it in time (a failover may take it back, or it may
        stay). The detail says so, and how to find out. An exception the store does not call
        unavailable (an error reply about the command itself) is a bug: re-raised, so it is
        logged once and answered 500.
        """
        if not storage.is_unavailable(exc):
            raise exc
        _log.warning("storage_unavailable", error=type(exc).__name__)
        write = request.method not in ("GET", "HEAD", "OPTIONS")
        extra: dict[str, Any] | None = None
        replicas = storage.unconfirmed_replicas(exc)
        if replicas is not None:
            required, confirmed = replicas
            detail = "The data store's replicas did not confirm the change in time; try again."
            extra = {"replicas_required": required, "replicas_confirmed": confirmed}
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
            ProblemError(
                503, "Storage unavailable", detail, extra=extra, headers={"Retry-After": "5"}
            )
        )

    return handle_storage_down


# --------------------------------------------------------------------------------------------
# Installing the handlers
# --------------------------------------------------------------------------------------------


async def _handle_problem_error(_request: Request, exc: Exception) -> Response:
    if not isinstance(exc, ProblemError):  # pragma: no cover - registered for ProblemError only
        raise exc
    return problem_response(exc)


def install_problem_handlers(app: FastAPI, *, unavailable: StorageErrors | None = None) -> None:
    """Make every error this app answers an RFC 9457 problem, without echoing client input.

    Covers `ProblemError`; Starlette/FastAPI ``HTTPException`` (404 for an unknown route, 405
    with its ``Allow`` header, anything raised with headers); request validation (422 with
    ``errors: [{loc, msg, type}]``, no input values); a body that is not JSON (400); the errors
    *unavailable* names, its data store's (503 with ``Retry-After``); and any other exception
    (500 with a generic detail, logged once with its traceback). The last one is a small ASGI
    middleware placed innermost among the user middleware, so call this before the app serves
    its first request, like ``add_middleware``.
    """
    if app.middleware_stack is not None:
        raise RuntimeError("install_problem_handlers must run before the app starts")
    app.add_exception_handler(ProblemError, _handle_problem_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_exception)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    if unavailable is not None:
        handle_storage_down = _storage_down_handler(unavailable)
        for error in unavailable.types:
            app.add_exception_handler(error, handle_storage_down)
    app.add_exception_handler(Exception, _handle_outer_exception)
    app.user_middleware.append(Middleware(_UnhandledErrorMiddleware))
