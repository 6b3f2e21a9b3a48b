"""The dead-letter console: one static page and its script, served by the archiver itself.

The page holds no data: its script reads and acts through the JSON API (``/v1/...``) with
the admin token the operator typed, kept in the tab's ``sessionStorage`` and sent as an
``Authorization`` header, never a cookie, so a page of another origin cannot act with it
(no CSRF surface). Every asset is package data here, so an offline cluster serves the whole
console, and the Content-Security-Policy allows nothing else: no inline script or style, no
other origin. What the API masks stays masked; ``reveal`` is the API's (audited).
"""

from __future__ import annotations

from importlib.resources import files
from typing import Final

from fastapi import APIRouter, Path, Response
from fastapi.responses import RedirectResponse

from courier_common.http import ProblemError

CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-cache",
}
_MEDIA_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_STATIC = files(__name__) / "static"
#: Every file the console has, read once: the routes serve these names and no other.
ASSETS: Final = {
    entry.name: entry.read_bytes()
    for entry in _STATIC.iterdir()
    if entry.is_file() and "." + entry.name.rsplit(".", 1)[-1] in _MEDIA_TYPES
}

router = APIRouter(include_in_schema=False)


def _asset(name: str) -> Response:
    if name not in ASSETS:
        raise ProblemError(404, "Not found")
    media_type = _MEDIA_TYPES["." + name.rsplit(".", 1)[-1]]
    return Response(ASSETS[name], media_type=media_type, headers=HEADERS)


@router.get("/console")
async def console() -> Response:
    """The page; its views are in the URL's fragment (``#/groups``, ``#/job/<id>``…)."""
    return _asset("index.html")


@router.get("/console/")
async def console_slash() -> RedirectResponse:
    return RedirectResponse("/console", status_code=308)


@router.get("/console/static/{name}")
async def asset(name: str = Path(pattern=r"^[a-z0-9-]+\.[a-z]+$")) -> Response:
    return _asset(name)
