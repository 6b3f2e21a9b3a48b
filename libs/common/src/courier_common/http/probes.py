"""Probes and the scrape endpoint: ``/healthz``, ``/readyz`` and ``/metrics``.

`health_router` gives liveness (the process can serve), readiness (its dependencies answer)
and the Prometheus scrape, hidden from the OpenAPI schema so API fuzzing stays on the business
API.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any, Final

from fastapi import APIRouter
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.responses import Response

from courier_common.logging import get_logger

__all__ = ["READINESS_TIMEOUT_SECONDS", "health_router"]

#: How long ``/readyz`` waits for the readiness callable before calling the service not ready.
#: Kubernetes' default probe timeout is 1 s; set ``timeoutSeconds`` above this in the chart.
READINESS_TIMEOUT_SECONDS: Final = 2.0

_log = get_logger(__name__)


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
