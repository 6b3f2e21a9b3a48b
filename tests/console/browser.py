"""What the console tests do in a tab, and how they make real dead letters."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import httpx
from playwright.async_api import BrowserContext, Page

from courier_common.messaging import AmqpConnection
from courier_sinks.smtp import SmtpSink
from courier_testing.polling import eventually
from tests.support.archiver import ADMIN_TOKEN, records
from tests.support.stack import Stack

REFUSED = (550, "5.7.1 relay denied")


@dataclass
class Console:
    """One browser tab on the console, and what its page complained about."""

    context: BrowserContext
    page: Page
    url: str
    shots: Path
    problems: list[str] = field(default_factory=list)

    async def open(self, fragment: str = "#/groups") -> None:
        await self.page.goto(f"{self.url}/console{fragment}")

    async def go(self, fragment: str) -> None:
        await self.page.evaluate("(hash) => { location.hash = hash; }", fragment)

    async def use_token(self, token: str = ADMIN_TOKEN) -> None:
        await self.page.fill("#token-input", token)
        await self.page.click("#token-use")
        await self.page.wait_for_selector("text=Admin token set for this tab")

    async def text(self) -> str:
        return await self.page.inner_text("body")

    async def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=str(path), full_page=True)
        return path


async def failing_group(
    stack: Stack,
    api: httpx.AsyncClient,
    smtp_sink: SmtpSink,
    emails: list[str],
    reason: tuple[int, str] = REFUSED,
) -> str:
    """One dead letter per address (the provider refuses them), then the provider works
    again. The group's fingerprint."""
    before = len(await records(api))
    smtp_sink.fail_next(len(emails), *reason)
    await asyncio.gather(*(stack.register(email) for email in emails))

    async def archived() -> bool:
        return len(await records(api)) >= before + len(emails)

    await eventually(archived, timeout=60, what=f"{len(emails)} dead letters")
    return str((await records(api))[0]["fingerprint"])


async def foreign_dead_letter(amqp_url: str, *, queue: str, reason: str) -> None:
    """A dead letter as another team's consumer sends it: its reason unmasked, as it wrote it."""
    connection = await AmqpConnection(amqp_url, client_name="test").connect()
    try:
        channel = await connection.channel()
        dlx = await channel.get_exchange("courier.dlx")
        await dlx.publish(
            aio_pika.Message(
                b'{"invoice": 7}',
                message_id=f"foreign-{queue}",
                content_type="application/json",
                headers={
                    "x-courier-failure-reason": reason,
                    "x-courier-failure-kind": "permanent",
                    "x-courier-original-queue": queue,
                    "x-courier-original-exchange": "billing",
                    "x-courier-original-routing-key": "invoice.due",
                },
            ),
            routing_key="invoice.due",
        )
    finally:
        await connection.close()
