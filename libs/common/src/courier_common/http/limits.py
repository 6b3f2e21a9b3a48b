"""Bounding request bodies: `BodySizeLimitMiddleware` answers 413 before a body fills memory.

It is a plain ASGI callable, not ``BaseHTTPMiddleware``: that one runs the app in another task,
which breaks streaming responses and hides contextvars (structlog's bound context, the OTel
span) set by the app from code after it. Its answers are problem details, like every error.
"""

from __future__ import annotations

from http import HTTPStatus

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from courier_common.http.problems import ProblemError, problem_response

__all__ = ["BodySizeLimitMiddleware"]


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
            ProblemError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                detail=f"The request body exceeds the limit of {self.max_body_bytes} bytes.",
                extra={"max_body_bytes": self.max_body_bytes},
                headers={"Connection": "close"},
            )
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            declared = _declared_length(scope)
        except ValueError as exc:
            response = problem_response(
                ProblemError(
                    HTTPStatus.BAD_REQUEST, detail=f"{exc}.", headers={"Connection": "close"}
                )
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
