"""A dead letter is acknowledged only once the replicas have its record.

The broker forgets a dead letter when the archiver acks it: a failover that lost the record
then would lose the only copy. `Archive.insert` is confirmed by ``COURIER_REDIS_MIN_REPLICAS``
replicas (``NotReplicatedError`` otherwise, and the archiver tries again), and so is the
duplicate answer of a second delivery: its first copy may be the unconfirmed one. An erasure
is confirmed the same way before its event is acknowledged.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from courier_common.events import USER_SERVICE_SOURCE, UserDeleted
from courier_common.messaging import new_event, new_event_id
from courier_common.redis import Durability, NotReplicatedError, connect
from courier_testing.private_services import PrivateRedis
from courier_testing.sentinel import RedisSentinelGroup, redis_sentinel_group
from dlq_archiver.erasure import Eraser
from dlq_archiver.records import DeadLetterRecord, fingerprint
from dlq_archiver.store import Archive

pytestmark = pytest.mark.fault
_FIXTURES = (redis_sentinel_group,)
FENCE = "t:replication-fence"


def dead_letter(message_id: str, user_id: str) -> DeadLetterRecord:
    now = datetime.now(UTC)
    body = {"type": "user.registered", "data": {"user_id": user_id, "email": "ada@example.com"}}
    reason = "SMTP 550"
    return DeadLetterRecord(
        id=str(new_event_id()),
        message_id=message_id,
        archived_at=now,
        source_queue="notification.user-events",
        event_type="user.registered",
        user_id=user_id,
        original_exchange="courier.events",
        original_routing_key="user.registered",
        reason=reason,
        reason_class="permanent",
        exception="x.PermanentError",
        attempts=1,
        first_failed_at=now,
        last_failed_at=now,
        trace_id=None,
        fingerprint=fingerprint("notification.user-events", "user.registered", "x", reason),
        body_b64=base64.b64encode(json.dumps(body).encode()).decode(),
        body_size=len(json.dumps(body)),
        content_type="application/json",
        properties={},
        headers={},
    )


@pytest.fixture
def lonely_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    with PrivateRedis(tmp_path / "redis") as server:
        yield server


async def test_without_replicas_archiving_and_erasing_are_not_confirmed(
    lonely_redis: PrivateRedis,
) -> None:
    client = connect(lonely_redis.url, max_connections=4)
    archive = Archive(client, prefix="t:", durability=Durability(1, 50, FENCE))
    user = new_event_id()
    user_id = str(user)
    first = dead_letter("m-1", user_id)
    try:
        with pytest.raises(NotReplicatedError):
            await archive.insert(first)
        assert (await archive.get(first.id)) is not None, "applied on the primary"
        # The redelivery finds the record, and still cannot promise it: not acked either.
        with pytest.raises(NotReplicatedError):
            await archive.insert(dead_letter("m-1", user_id))
        event = new_event(UserDeleted(user_id=user), source=USER_SERVICE_SOURCE)
        with pytest.raises(NotReplicatedError):
            await Eraser(archive).on_user_deleted(event)
        erased = await archive.get(first.id)
        assert erased is not None
        assert erased.erased, "redacted on the primary all the same"
    finally:
        await client.aclose()


async def test_with_a_replica_the_record_is_there_when_insert_returns(
    redis_sentinel_group: RedisSentinelGroup,
) -> None:
    group = redis_sentinel_group
    client = connect(group.primary().url, max_connections=4)
    archive = Archive(client, prefix="t:", durability=Durability(1, 2000, FENCE))
    replica = redis.Redis(port=group.replicas()[0].port, socket_timeout=5)
    user = new_event_id()
    user_id = str(user)
    first = dead_letter("m-2", user_id)
    try:
        assert await archive.insert(first) is None
        assert replica.exists(f"t:dlq:rec:{first.id}")
        assert await archive.insert(dead_letter("m-2", user_id)) == first.id
        event = new_event(UserDeleted(user_id=user), source=USER_SERVICE_SOURCE)
        await Eraser(archive).on_user_deleted(event)
        copy = DeadLetterRecord.model_validate_json(replica.get(f"t:dlq:rec:{first.id}") or b"")
        assert copy.erased
        assert b"ada@example.com" not in base64.b64decode(copy.body_b64)
    finally:
        replica.close()
        await client.aclose()
