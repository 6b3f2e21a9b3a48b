"""The erased-user mark is confirmed by the replicas before user.deleted is acknowledged.

A failover that lost the mark would let a welcome still waiting in a retry tier reach the
erased user after all, so ``on_user_deleted`` raises (the event is retried) until
``COURIER_REDIS_MIN_REPLICAS`` replicas have it. Against a private Redis nobody replicates.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from courier_common.events import USER_SERVICE_SOURCE, UserDeleted
from courier_common.messaging import IdempotencyStore, new_event, new_event_id
from courier_common.redis import Durability, NotReplicatedError, connect
from courier_testing.private_services import PrivateRedis
from notification_service.handlers import NotificationMetrics, Notifier
from notification_service.rendering import Renderer
from notification_service.senders import EmailSender, HttpProvider

pytestmark = pytest.mark.fault


@pytest.fixture
async def lonely_url(tmp_path: Path) -> AsyncIterator[str]:
    with PrivateRedis(tmp_path / "redis") as server:
        yield server.url


def notifier(url: str, http: httpx.AsyncClient, durability: Durability) -> Notifier:
    redis = connect(url, max_connections=4)
    return Notifier(
        email=EmailSender(host="127.0.0.1", port=1, sender="courier@example.com", timeout=1),
        sms=HttpProvider(channel="sms", url="http://127.0.0.1:1/sms", token="t", client=http),
        push=HttpProvider(channel="push", url="http://127.0.0.1:1/push", token="t", client=http),
        renderer=Renderer(),
        idempotency=IdempotencyStore(redis, prefix="t:"),
        redis=redis,
        prefix="t:",
        metrics=NotificationMetrics(CollectorRegistry()),
        durability=durability,
    )


async def test_an_unconfirmed_erased_mark_fails_the_event_but_is_set(lonely_url: str) -> None:
    user_id = new_event_id()
    event = new_event(UserDeleted(user_id=user_id), source=USER_SERVICE_SOURCE)
    async with httpx.AsyncClient() as http:
        confirmed = notifier(lonely_url, http, Durability(1, 50, "t:replication-fence"))
        try:
            with pytest.raises(NotReplicatedError):
                await confirmed.on_user_deleted(event)
            # Set on the primary (a redelivery sets it again), just not confirmed.
            assert await confirmed.redis.exists(f"t:notif:erased:{user_id}") == 1
        finally:
            await confirmed.redis.aclose()
        single = notifier(lonely_url, http, Durability(0, fence_key="t:replication-fence"))
        try:
            await single.on_user_deleted(event)  # no replicas asked for: done
        finally:
            await single.redis.aclose()
