"""The archive's own mechanics on the real Redis: paging, filters, retention, groups."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime, timedelta

import redis.asyncio

from courier_common.messaging import new_event_id
from dlq_archiver.records import DeadLetterRecord, fingerprint, normalize_reason
from dlq_archiver.store import Archive, Filter
from notification_service.routes import USER_EVENTS_QUEUE


def record(n: int, *, queue: str = USER_EVENTS_QUEUE, reason: str = "SMTP 550") -> DeadLetterRecord:
    now = datetime.now(UTC)
    return DeadLetterRecord(
        id=str(new_event_id()),
        message_id=f"m-{n}",
        archived_at=now,
        source_queue=queue,
        event_type="user.registered",
        original_exchange="courier.events",
        original_routing_key="user.registered",
        reason=reason,
        reason_class="permanent",
        exception="x.PermanentError",
        attempts=1,
        first_failed_at=now,
        last_failed_at=now,
        trace_id=None,
        fingerprint=fingerprint(queue, "user.registered", "x.PermanentError", reason),
        body_b64=base64.b64encode(b"{}").decode(),
        body_size=2,
        content_type="application/json",
        properties={},
        headers={},
    )


async def test_pages_newest_first_with_cursors_and_filters(
    redis_client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    archive = Archive(redis_client, prefix=redis_prefix)
    stored = [record(n, queue="a" if n % 2 else "b") for n in range(25)]
    for item in stored:
        assert await archive.insert(item) is None
    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = await archive.page(Filter(), limit=10, cursor=cursor)
        seen.extend(r.id for r in page)
        if cursor is None:
            break
    assert seen == [r.id for r in reversed(stored)]
    only_a, _ = await archive.page(Filter(queue="a"), limit=100)
    assert [r.id for r in only_a] == [r.id for r in reversed(stored) if r.source_queue == "a"]
    assert (
        await archive.insert(stored[0].model_copy(update={"id": str(new_event_id())}))
        == stored[0].id
    )


async def test_retention_by_count_and_age_keeps_groups_consistent(
    redis_client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    archive = Archive(redis_client, prefix=redis_prefix)
    for n in range(12):
        await archive.insert(record(n))
    assert await archive.trim(max_age_seconds=None, max_count=5) == 7
    assert await archive.size() == 5
    [group] = await archive.groups()
    assert group["count"] == 5
    assert await archive.trim(max_age_seconds=3600, max_count=None) == 0
    assert await archive.trim(max_age_seconds=0.0001, max_count=None) == 5
    assert await archive.size() == 0
    assert await archive.groups() == []


async def test_time_window_filter(redis_client: redis.asyncio.Redis, redis_prefix: str) -> None:
    archive = Archive(redis_client, prefix=redis_prefix)
    for n in range(3):
        await archive.insert(record(n))
    future = datetime.now(UTC) + timedelta(minutes=1)
    assert (await archive.page(Filter(since=future)))[0] == []
    assert len((await archive.page(Filter(until=future)))[0]) == 3


def test_reasons_with_different_ids_group_together() -> None:
    a = normalize_reason(
        "SMTP 550: <ada@example.com> unknown, id 01a1fd0a-dff2-7243-92a1-3bd4f21d76c8"
    )
    b = normalize_reason(
        "SMTP 550: <bob@example.org> unknown, id 01a1fd0a-ffff-7243-92a1-3bd4f21d76c8"
    )
    assert a == b
    assert "example" not in a


async def test_concurrent_replays_and_erasure_all_land_in_the_record(
    redis_client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    """Found by the fault suite (F9): six replays at once kept one entry in the history."""
    archive = Archive(redis_client, prefix=redis_prefix)
    stored = record(1)
    assert await archive.insert(stored) is None

    def erase(found: DeadLetterRecord) -> bool:
        found.erased = True
        found.body_b64 = base64.b64encode(b"{}").decode()
        return True

    await asyncio.gather(
        *(archive.mark_replayed(stored.id, f"replay-{n}", None) for n in range(6)),
        archive.update(stored.id, erase),
    )
    final = await archive.get(stored.id)
    assert final is not None
    assert sorted(r.replay_id for r in final.replays) == [f"replay-{n}" for n in range(6)]
    assert final.erased, "a replay mark must not write the unredacted record back"
    assert final.status == "replayed"
    assert await archive.update("no-such-record", erase) is None
