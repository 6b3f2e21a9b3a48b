"""Small helpers for tests of the Courier stack: what user-service emits, and what it takes."""

from __future__ import annotations

from typing import Any

import redis.asyncio

from courier_testing.polling import eventually


def user_payload(email: str = "ada@example.com", **extra: Any) -> dict[str, Any]:
    return {"email": email, "display_name": "Ada", "locale": "en", **extra}


async def outbox_emptied(client: redis.asyncio.Redis, prefix: str, timeout: float = 15) -> None:
    """Until user-service's outbox (under *prefix*) holds nothing.

    An entry leaves the outbox once the broker has confirmed its event, and a confirmed event
    is in every queue bound for it already: after this, a tap holds all the service emitted.
    """

    async def empty() -> bool:
        return int(await client.xlen(f"{prefix}outbox")) == 0

    await eventually(empty, timeout=timeout, what="the outbox to be published")
