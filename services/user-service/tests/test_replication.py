"""Writes confirmed by replicas: a 201, 200 or 204 only once COURIER_REDIS_MIN_REPLICAS have it.

Against a private Redis with no replica every write is applied and answered with the 503
"may have been applied", replays and no-op PATCHes included; against a private Sentinel group
(one replica) the same requests succeed, and the replica has each change when it is answered.
The outbox relay publishes only what the replicas confirmed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import structlog

from courier_testing.events import EventTap
from courier_testing.polling import eventually
from courier_testing.private_services import PrivateRedis
from courier_testing.sentinel import SERVICE, RedisSentinelGroup, redis_sentinel_group
from tests.support.helpers import user_payload
from user_service.config import Settings
from user_service.models import email_key

pytestmark = pytest.mark.fault
_FIXTURES = (redis_sentinel_group,)


@pytest.fixture
def lonely_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A primary nobody replicates: WAIT 1 can never be satisfied."""
    with PrivateRedis(tmp_path / "redis") as server:
        yield server


def assert_in_doubt(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "5"
    problem: dict[str, Any] = response.json()
    assert problem["title"] == "Storage unavailable"
    assert "may have been applied" in problem["detail"]
    assert (problem["replicas_required"], problem["replicas_confirmed"]) == (1, 0)
    return problem


async def test_without_the_replicas_every_write_is_a_503_in_doubt(
    settings: Settings,
    lonely_redis: PrivateRedis,
    make_client: Callable[[Settings], Any],
    event_tap: EventTap,
) -> None:
    lonely = settings.model_copy(
        update={
            "redis_url": lonely_redis.url,
            "redis_min_replicas": 1,
            "redis_replica_timeout_ms": 50,
        }
    )
    key = {"Idempotency-Key": "replicas-late-1"}
    async with make_client(lonely) as client:
        with structlog.testing.capture_logs() as logs:
            assert_in_doubt(await client.post("/v1/users", json=user_payload(), headers=key))
            # In doubt, not refused: the primary has the user and its outbox entry...
            found = (await client.get("/v1/users", params={"email": "ada@example.com"})).json()
            [user] = found["items"]

            # ...but the relay publishes only what the replicas confirmed: a failover could
            # still take this registration, and its welcome must not have gone out then.
            def held_back() -> bool:  # the relay read the entry twice and would not publish it
                refusals = [
                    e
                    for e in logs
                    if e["event"] == "outbox_redis_error" and "NotReplicatedError" in e["error"]
                ]
                return len(refusals) >= 2

            await eventually(held_back, what="two relay rounds holding the entry back")
        assert await event_tap.queue.get(no_ack=True, fail=False) is None
        primary = redis.Redis(port=lonely_redis.port, socket_timeout=5)
        assert primary.xlen(f"{lonely.redis_prefix}outbox") == 1, "kept, not published"
        primary.close()
        # The retry with the same key must not turn that 503 into an unconfirmed 201.
        assert_in_doubt(await client.post("/v1/users", json=user_payload(), headers=key))

        path = f"/v1/users/{user['id']}"
        assert_in_doubt(await client.patch(path, json={"display_name": "Ada L."}))
        assert (await client.get(path)).json()["display_name"] == "Ada L."
        # The same PATCH again changes nothing, and still promises nothing unconfirmed.
        assert_in_doubt(await client.patch(path, json={"display_name": "Ada L."}))
        assert_in_doubt(await client.delete(path))
        # Reads make no promise about replicas: they answer as usual.
        assert (await client.get(path)).status_code == 404
        assert (await client.get("/readyz")).status_code == 200


async def test_with_a_replica_writes_are_answered_once_the_replica_has_them(
    settings: Settings,
    redis_sentinel_group: RedisSentinelGroup,
    make_client: Callable[[Settings], Any],
    event_tap: EventTap,
) -> None:
    group = redis_sentinel_group
    behind = settings.model_copy(
        update={
            "redis_url": "redis://127.0.0.1:1/0",  # unused: the Sentinels name the primary
            "redis_sentinels": group.sentinel_addresses,
            "redis_sentinel_service": SERVICE,
        }
    )
    assert behind.redis_replicas_required == 1  # the default behind Sentinel
    replica = redis.Redis(port=group.replicas()[0].port, socket_timeout=5)
    prefix = settings.redis_prefix
    key = {"Idempotency-Key": "replicas-ok-1"}
    try:
        async with make_client(behind) as client:
            assert await event_tap.queue.get(no_ack=True, fail=False) is None
            created = await client.post("/v1/users", json=user_payload(), headers=key)
            assert created.status_code == 201, created.text
            user = created.json()
            # Answered means replicated: the replica has the user and its email claim now.
            assert replica.exists(f"{prefix}user:{user['id']}")
            assert replica.get(f"{prefix}user-email:{email_key('ada@example.com')}") == (
                user["id"].encode()
            )

            replay = await client.post("/v1/users", json=user_payload(), headers=key)
            assert replay.status_code == 201
            assert replay.headers["idempotent-replayed"] == "true"
            assert replay.json() == user

            path = f"/v1/users/{user['id']}"
            patched = await client.patch(path, json={"display_name": "Ada L."})
            assert patched.status_code == 200, patched.text
            assert b"Ada L." in (replica.get(f"{prefix}user:{user['id']}") or b"")
            same = await client.patch(path, json={"display_name": "Ada L."})
            assert same.status_code == 200
            assert same.json() == patched.json()

            assert (await client.delete(path)).status_code == 204
            assert not replica.exists(f"{prefix}user:{user['id']}")
            # Confirmed, so published: registered, updated, deleted.
            await event_tap.collect(3)
            types = [e["type"] for e in event_tap.bodies()]
            assert types == ["user.registered", "user.updated", "user.deleted"]
    finally:
        replica.close()
