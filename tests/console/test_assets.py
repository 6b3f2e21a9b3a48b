"""The console's page and assets: served by the archiver itself, under a strict CSP, or off."""

from __future__ import annotations

import re

import httpx

from dlq_archiver.config import Settings
from dlq_archiver.console import ASSETS, CONTENT_SECURITY_POLICY
from dlq_archiver.main import create_app


def client(settings: Settings) -> httpx.AsyncClient:
    # No lifespan: the console's routes need no broker or Redis.
    app = create_app(settings)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://archiver")


async def test_the_page_and_every_asset_are_local_under_a_strict_policy(
    archiver_settings: Settings,
) -> None:
    async with client(archiver_settings) as archiver:
        page = await archiver.get("/console")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        policy = page.headers["content-security-policy"]
        assert policy == CONTENT_SECURITY_POLICY
        for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'"):
            assert directive in policy
        assert "unsafe" not in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        assert "set-cookie" not in page.headers

        html = page.text
        assert re.search(r"<script(?![^>]*\bsrc=)", html) is None  # no inline script
        assert "<style" not in html
        assert " style=" not in html
        assert re.search(r"\bon[a-z]+=", html) is None  # no inline handler
        referenced = re.findall(r'(?:src|href)="([^"#]+)"', html)
        assert referenced  # the script, the stylesheet and the icon
        for url in referenced:
            assert url.startswith("/console/static/"), url  # no other origin
            asset = await archiver.get(url)
            assert asset.status_code == 200, url
            assert asset.headers["x-content-type-options"] == "nosniff"
        script = (await archiver.get("/console/static/console.js")).text
        assert ".innerHTML" not in script  # API values go in as text only
        assert "http://" not in script
        assert "https://" not in script
        assert "document.cookie" not in script

        assert set(ASSETS) == {"index.html", "console.js", "console.css", "icon.svg"}
        for name in ("../config.py", "__init__.py", "nope.js"):
            assert (await archiver.get(f"/console/static/{name}")).status_code in (404, 422)


async def test_the_console_can_be_turned_off(archiver_settings: Settings) -> None:
    async with client(archiver_settings.model_copy(update={"console_enabled": False})) as off:
        assert (await off.get("/console")).status_code == 404
        assert (await off.get("/console/static/console.js")).status_code == 404
