"""The HTTP sink: an SMS and push provider that keeps every request and fails on demand.

``POST /sms``, ``POST /push`` (any ``POST /<path>``, in fact) answer like the providers
Courier is written against: ``202 {"id": "<uuid>", "status": "accepted"}``. Each request is
recorded whatever it was answered, with its answer, so a test can tell a real delivery from
a retry that failed, and from an idempotent replay:

* Auth, when a token is set: ``Authorization: Bearer <token>`` or 401 (recorded, and the
  failure switch is not used up by it: a bad token is a bug, not an outage).
* The failure switch: delay, then the error status (with ``Retry-After`` when asked),
  or — with status null — the normal answer, late.
* Idempotency: a request whose ``Idempotency-Key`` was already *accepted* on the same path
  gets the first answer again, as Stripe-style APIs do, recorded with ``replay: true`` and
  answered with an ``Idempotent-Replayed: true`` header. Keys are per path because SMS and
  push stand for two different providers. Only accepted requests claim a key, so a retry
  after an injected 503 is a real delivery.

Credentials never reach the record in clear: see `mask_credentials`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import uuid
from pathlib import Path
from typing import Any, TypedDict

from starlette.applications import Starlette
from starlette.datastructures import Headers, QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from courier_sinks.base import SinkBase
from courier_sinks.control import ControlSpec, control_mount, error_response
from courier_sinks.failures import FailureSwitch, HttpFailure, parse_http_failure
from courier_sinks.serving import UvicornService, bind, display_address
from courier_sinks.store import RecordStore, utc_now

__all__ = ["HttpSink", "RecordedRequest", "create_http_app", "mask_credentials"]

_log = logging.getLogger(__name__)

# Headers that carry credentials: recorded masked, never in clear.
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "cookie"})
# A secret shorter than this is masked completely: its last 4 characters would be most of it.
_MIN_SECRET_FOR_HINT = 8


class RecordedRequest(TypedDict):
    """One provider request, as stored (one JSON line) and as ``/_sink/requests`` lists it.

    ``body`` is the parsed JSON when the body is JSON (``body_is_json``), else its text.
    ``status`` is what the sink answered; ``id`` the provider id it answered with (None for
    errors); ``replay`` is true for an idempotent replay of an accepted request.
    """

    received_at: str
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any
    body_is_json: bool
    status: int
    id: str | None
    replay: bool


def mask_credentials(value: str) -> str:
    """``Bearer abcdef123456`` → ``Bearer ****3456``: the scheme and a hint, not the secret.

    The last four characters let a test tell which token was sent; a secret under 8
    characters shows none of itself.
    """
    scheme, space, secret = value.strip().partition(" ")
    if not space:
        scheme, secret = "", scheme
    secret = secret.strip()
    hint = secret[-4:] if len(secret) >= _MIN_SECRET_FOR_HINT else ""
    return f"{scheme} ****{hint}".lstrip()


def _recorded_headers(headers: Headers) -> dict[str, str]:
    """Every header, lower-cased, repeated ones joined with ", ", credentials masked."""
    recorded: dict[str, str] = {}
    for name in headers:
        if name in recorded:
            continue
        values = headers.getlist(name)
        if name in SECRET_HEADERS:
            values = [mask_credentials(value) for value in values]
        recorded[name] = ", ".join(values)
    return recorded


def _decoded_body(raw: bytes) -> tuple[Any, bool]:
    text = raw.decode("utf-8", "replace")
    if not raw.strip():
        return text, False
    try:
        return json.loads(text), True
    except ValueError:
        return text, False


def _select_requests(requests: list[RecordedRequest], query: QueryParams) -> list[RecordedRequest]:
    """``?path=/sms`` keeps the requests to that path."""
    path = query.get("path")
    if path is None:
        return requests
    wanted = path if path.startswith("/") else "/" + path
    return [r for r in requests if r["path"] == wanted]


class _Provider:
    """The provider endpoint's behaviour and state (the idempotency keys it has seen)."""

    def __init__(
        self,
        store: RecordStore[RecordedRequest],
        switch: FailureSwitch[HttpFailure],
        token: str | None,
    ) -> None:
        self.store = store
        self.switch = switch
        self._token = token
        self._accepted: dict[tuple[str, str], dict[str, str]] = {}
        self._lock = threading.Lock()  # clear() comes from the test thread

    def forget_keys(self) -> None:
        with self._lock:
            self._accepted.clear()

    def _authorized(self, request: Request) -> bool:
        if self._token is None:
            return True
        expected = f"Bearer {self._token}".encode()
        given = request.headers.get("authorization", "").strip().encode()
        return hmac.compare_digest(given, expected)

    async def handle(self, request: Request) -> Response:
        path = request.url.path
        body, is_json = _decoded_body(await request.body())
        record = RecordedRequest(
            received_at=utc_now(),
            method=request.method,
            path=path,
            query=request.url.query,
            headers=_recorded_headers(request.headers),
            body=body,
            body_is_json=is_json,
            status=0,
            id=None,
            replay=False,
        )
        response = await self._answer(request, path, record)
        record["status"] = response.status_code
        self.store.append(record)
        _log.info(
            "http-sink: %s %s -> %d%s",
            request.method,
            path,
            response.status_code,
            " (replay)" if record["replay"] else "",
        )
        return response

    async def _answer(self, request: Request, path: str, record: RecordedRequest) -> Response:
        """Decide the answer; fills in ``id`` and ``replay`` on *record*."""
        if not self._authorized(request):
            return error_response(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )
        failure = self.switch.take(lambda f: f.applies_to(path))
        if failure is not None:
            if failure.delay_ms:
                try:
                    await asyncio.sleep(failure.delay_ms / 1000)
                except asyncio.CancelledError:
                    # uvicorn cancels what still runs when a stop's grace period is over.
                    # Answering (and recording) beats a 500 with a traceback in the log.
                    return error_response(
                        503, "courier-http-sink is stopping", headers={"Connection": "close"}
                    )
            if failure.status is not None:
                headers = {}
                if failure.retry_after is not None:
                    headers["Retry-After"] = str(failure.retry_after)
                message = failure.message or "failure injected by courier-http-sink"
                return error_response(failure.status, message, headers=headers)

        key = request.headers.get("idempotency-key")
        with self._lock:
            earlier = self._accepted.get((path, key)) if key else None
            if earlier is None:
                answer = {"id": str(uuid.uuid4()), "status": "accepted"}
                if key:
                    self._accepted[(path, key)] = answer
        if earlier is not None:
            record["id"], record["replay"] = earlier["id"], True
            return JSONResponse(earlier, status_code=202, headers={"Idempotent-Replayed": "true"})
        record["id"] = answer["id"]
        return JSONResponse(answer, status_code=202)


def create_http_app(
    store: RecordStore[RecordedRequest],
    switch: FailureSwitch[HttpFailure],
    *,
    token: str | None = None,
) -> Starlette:
    """The whole HTTP sink as an ASGI app: ``/_sink/...`` control routes, then ``POST /*``."""
    provider = _Provider(store, switch, token)
    spec = ControlSpec(
        kind="http",
        records="requests",
        store=store,
        switch=switch,
        parse_failure=parse_http_failure,
        select=_select_requests,
        on_clear=provider.forget_keys,
    )
    app = Starlette(
        routes=[
            control_mount(spec),
            Route("/{path:path}", provider.handle, methods=["POST"]),
        ]
    )
    app.state.provider = provider
    return app


class HttpSink(SinkBase[RecordedRequest, HttpFailure]):
    """The HTTP sink served by uvicorn in a background thread.

    Port 0 (the default) picks a free port; `url` tells the base URL after `start`, e.g.
    ``f"{sink.url}/sms"`` for ``COURIER_SMS_URL``. *token* set → requests need
    ``Authorization: Bearer <token>``. *store_path* None keeps requests in memory only.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        store_path: Path | str | None = None,
        *,
        token: str | None = None,
    ) -> None:
        super().__init__("courier-http-sink", store_path)
        self.host = host
        self.token = token
        self._requested_port = port
        self.app = create_http_app(self.store, self.switch, token=token)
        self._service: UvicornService | None = None

    def _bind(self) -> list[socket.socket]:
        return [bind(self.host, self._requested_port)]

    async def _serve(self) -> None:
        self._service = UvicornService(self.app, self._sockets[0])
        await self._service.start()

    async def _shutdown(self) -> None:
        if self._service is not None:
            await self._service.stop()
            self._service = None

    @property
    def port(self) -> int:
        if not self._sockets:
            raise RuntimeError("the HTTP sink is not running")
        return display_address(self._sockets[0])[1]

    @property
    def url(self) -> str:
        """Base URL, ``http://host:port``, no trailing slash; the control API is under it."""
        if not self._sockets:
            raise RuntimeError("the HTTP sink is not running")
        host, port = display_address(self._sockets[0])
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received, oldest first, whatever it was answered (a copy)."""
        return self.store.all()

    @property
    def deliveries(self) -> list[RecordedRequest]:
        """The requests that were real deliveries: accepted (202) and not replays."""
        return [r for r in self.store.all() if r["status"] == 202 and not r["replay"]]

    def clear(self) -> None:
        """Forget every request and every idempotency key seen: a provider with no history."""
        super().clear()
        self.app.state.provider.forget_keys()

    def fail_next(
        self,
        count: int = 1,
        status: int | None = 503,
        *,
        path: str | None = None,
        retry_after: int | None = None,
        delay_ms: int = 0,
        message: str | None = None,
    ) -> None:
        """Answer the next *count* requests (to *path* only, if given) with *status*.

        *status* None answers normally after *delay_ms*. Validated exactly like
        ``POST /_sink/fail``; raises `ValueError` on a bad value.
        """
        body: dict[str, Any] = {"count": count, "status": status, "delay_ms": delay_ms}
        for name, value in (("path", path), ("retry_after", retry_after), ("message", message)):
            if value is not None:
                body[name] = value
        self.switch.arm(*parse_http_failure(body))

    def delay_next(self, count: int, delay_ms: int, *, path: str | None = None) -> None:
        """Answer the next *count* requests normally, but only after *delay_ms*."""
        self.fail_next(count, None, path=path, delay_ms=delay_ms)

    def wait_for_requests(
        self, count: int = 1, *, path: str | None = None, timeout: float = 10.0
    ) -> list[RecordedRequest]:
        """Block until *count* requests (to *path*, if given) arrived; return them."""
        return self.store.wait_for(
            count,
            timeout=timeout,
            where=None if path is None else (lambda r: r["path"] == path),
        )
