"""The control API both sinks share, under ``/_sink``: read, clear, break, and probe.

* ``GET /_sink/healthz``: ``{"status": "ok", "kind": "smtp"|"http", "records":
  "messages"|"requests", "count": n}``.
* ``GET /_sink/<records>``: every record, oldest first, narrowed by the sink's filters
  (``?to=`` on the SMTP sink, ``?path=`` on the HTTP sink).
* ``DELETE /_sink/<records>``: forget every record (memory and file); 204.
* ``GET /_sink/fail``: the failure switch: ``armed``, ``remaining``, ``used``, the failure.
* ``POST /_sink/fail``: arm it with a JSON body (see `courier_sinks.failures`); 200 with the
  new state, 422 (with the reason) for a body that does not validate.
* ``DELETE /_sink/fail``: disarm it; 204.

The same shape on both sinks lets `courier_sinks.client.SinkControl` drive either one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from courier_sinks.failures import FailureSwitch
from courier_sinks.store import RecordStore

__all__ = ["ControlSpec", "control_mount", "error_response"]

PREFIX = "/_sink"


def error_response(
    status: int, message: str, *, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """``{"error": <reason phrase>, "status": n, "message": ...}``: small and greppable."""
    body = {"error": HTTPStatus(status).phrase, "status": status, "message": message}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


@dataclass(frozen=True)
class ControlSpec:
    """What differs between the two sinks' control APIs; the routes are the same."""

    kind: str  # "smtp" | "http"
    records: str  # the collection's name in the URL: "messages" | "requests"
    store: RecordStore[Any]
    switch: FailureSwitch[Any]
    parse_failure: Callable[[Mapping[str, Any]], tuple[int, Any]]
    # Narrows a listing by the query string; unknown parameters are ignored.
    select: Callable[[list[Any], QueryParams], list[Any]]
    # Called after the records are cleared, for state that belongs with them (idempotency).
    on_clear: Callable[[], None] | None = None


def control_mount(spec: ControlSpec) -> Mount:
    """The ``/_sink`` routes for one sink, as a Starlette `Mount`.

    A Mount rather than loose routes, so that a POST to ``/_sink/...`` on the HTTP sink is
    answered here (405) and never falls through to the catch-all provider route.
    """

    async def healthz(_request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "status": "ok",
                "kind": spec.kind,
                "records": spec.records,
                "count": len(spec.store),
            },
            headers={"Cache-Control": "no-store"},
        )

    async def records(request: Request) -> Response:
        if request.method == "DELETE":
            spec.store.clear()
            if spec.on_clear is not None:
                spec.on_clear()
            return Response(status_code=HTTPStatus.NO_CONTENT)
        return JSONResponse(spec.select(spec.store.all(), request.query_params))

    async def fail(request: Request) -> Response:
        if request.method == "DELETE":
            spec.switch.clear()
            return Response(status_code=HTTPStatus.NO_CONTENT)
        if request.method == "POST":
            try:
                body = json.loads(await request.body() or b"{}")
            except ValueError as exc:
                return error_response(HTTPStatus.BAD_REQUEST, f"body is not JSON: {exc}")
            if not isinstance(body, dict):
                return error_response(HTTPStatus.UNPROCESSABLE_ENTITY, "body must be an object")
            try:
                count, failure = spec.parse_failure(body)
            except ValueError as exc:
                return error_response(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc))
            spec.switch.arm(count, failure)
        return JSONResponse(spec.switch.state())

    return Mount(
        PREFIX,
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route(f"/{spec.records}", records, methods=["GET", "DELETE"]),
            Route("/fail", fail, methods=["GET", "POST", "DELETE"]),
        ],
    )
