"""The console in a real browser: Debian's chromium, driven by Playwright, on a running archiver.

The archiver runs as its console script on a free port (the browser needs a real socket), on
the test's vhost and Redis prefix; user-service and notification-service run in-process
against the SMTP sink, so every dead letter is a real one. Chromium is the system's
(``scripts/bootstrap.sh`` installs it); a missing one fails the tests, never skips them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, ConsoleMessage, async_playwright

from tests.console.browser import Console
from tests.support.archiver import StartArchiver
from tests.support.processes import REPO, ServiceProcess

CHROMIUM = os.environ.get("COURIER_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: Set (to anything) to write the screenshots the README shows into docs/console/.
SCREENSHOTS_ENV = "COURIER_CONSOLE_SCREENSHOTS"


@pytest.fixture
def console_archiver(start_archiver: StartArchiver) -> ServiceProcess:
    return start_archiver(COURIER_REPLAY_CANARY_WAIT_SECONDS="1")


@pytest.fixture
async def api(console_archiver: ServiceProcess) -> AsyncIterator[httpx.AsyncClient]:
    """The same archiver's API, without the token."""
    async with httpx.AsyncClient(base_url=console_archiver.url, timeout=10) as client:
        yield client


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not shutil.which(CHROMIUM):
        pytest.fail(
            f"chromium is not installed at {CHROMIUM}: run scripts/bootstrap.sh "
            "(or `apt-get install chromium`)",
            pytrace=False,
        )
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def console(
    browser: Browser, console_archiver: ServiceProcess, tmp_path: Path
) -> AsyncIterator[Console]:
    context = await browser.new_context(viewport={"width": 1360, "height": 860})
    page = await context.new_page()
    shots = REPO / "docs" / "console" if os.environ.get(SCREENSHOTS_ENV) else tmp_path
    tab = Console(context, page, console_archiver.url, shots)

    def complain(message: ConsoleMessage) -> None:
        # A CSP violation or a script error is a broken console, whatever else passes.
        if message.type == "error" and "401" not in message.text and "403" not in message.text:
            tab.problems.append(message.text)

    page.on("console", complain)
    page.on("pageerror", lambda error: tab.problems.append(f"page error: {error}"))
    page.set_default_timeout(20_000)
    yield tab
    await context.close()
    assert tab.problems == [], tab.problems
