"""The claim / done / release protocol on the real Redis."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio

from courier_common.messaging import IdempotencyStore, RetryableError
from courier_common.messaging.idempotency import Claim, ClaimResult, track_skips


@pytest.fixture
def store(redis_client: redis.asyncio.Redis, redis_prefix: str) -> IdempotencyStore:
    return IdempotencyStore(redis_client, prefix=redis_prefix, lease_seconds=0.5)


async def test_claim_then_done_skips_later_claims(store: IdempotencyStore) -> None:
    key = store.key("notifier", "evt-1", "email")
    first = await store.claim(key)
    assert first.result is ClaimResult.CLAIMED
    assert (await store.claim(key)).result is ClaimResult.BUSY
    assert await store.done(first) is True
    assert (await store.claim(key)).result is ClaimResult.DONE
    assert await store.is_done(key)


async def test_release_lets_the_next_attempt_claim_at_once(store: IdempotencyStore) -> None:
    key = store.key("notifier", "evt-2", "sms")
    claim = await store.claim(key)
    await store.release(claim)
    assert (await store.claim(key)).result is ClaimResult.CLAIMED


async def test_a_dead_workers_claim_expires_after_the_lease(store: IdempotencyStore) -> None:
    key = store.key("notifier", "evt-3", "push")
    await store.claim(key)  # the worker dies here: no done, no release
    assert (await store.claim(key)).result is ClaimResult.BUSY
    await asyncio.sleep(0.7)
    assert (await store.claim(key)).result is ClaimResult.CLAIMED


async def test_a_stale_owner_cannot_release_or_complete_anothers_claim(
    store: IdempotencyStore,
) -> None:
    key = store.key("notifier", "evt-4", "email")
    stale = await store.claim(key)
    await asyncio.sleep(0.7)  # lease passes; another worker claims
    fresh = await store.claim(key)
    assert fresh.result is ClaimResult.CLAIMED
    await store.release(stale)
    assert (await store.claim(key)).result is ClaimResult.BUSY
    assert await store.done(stale) is False
    assert await store.done(fresh) is True


async def test_run_once_runs_skips_and_releases_on_failure(store: IdempotencyStore) -> None:
    key = store.key("c", "evt-5")
    calls: list[str] = []

    async def effect() -> str:
        calls.append("ran")
        return "sent"

    async def failing() -> str:
        raise OSError("connection reset")

    tracker = track_skips()
    with pytest.raises(OSError, match="reset"):
        await store.run_once(key, failing)
    assert await store.run_once(key, effect) == "sent"
    assert await store.run_once(key, effect) is None
    assert calls == ["ran"]
    assert (tracker.ran, tracker.skipped) == (1, 1)


async def test_run_once_waits_out_a_dead_workers_lease_then_runs_once(
    store: IdempotencyStore,
) -> None:
    key = store.key("c", "evt-6")
    await store.claim(key)  # a worker took it and died: its lease (0.5 s) must run out
    ran: list[int] = []

    async def effect() -> int:
        ran.append(1)
        return 7

    assert await store.run_once(key, effect) == 7
    assert ran == [1]
    assert await store.is_done(key)


async def test_run_once_skips_when_the_holder_finishes_while_it_waits(
    store: IdempotencyStore,
) -> None:
    key = store.key("c", "evt-7")
    holder = await store.claim(key)

    async def finish_soon() -> None:
        await asyncio.sleep(0.1)
        await store.done(holder)

    async def effect() -> str:
        raise AssertionError("must not run: the holder did it")

    finishing = asyncio.create_task(finish_soon())
    assert await store.run_once(key, effect) is None
    await finishing


async def test_run_once_asks_for_a_retry_after_the_lease_when_still_held(
    redis_client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    store = IdempotencyStore(
        redis_client, prefix=redis_prefix, lease_seconds=30, busy_wait_seconds=0.2
    )
    key = store.key("c", "evt-8")
    await store.claim(key)

    async def effect() -> None:
        raise AssertionError("must not run")

    with pytest.raises(RetryableError, match="another worker") as caught:
        await store.run_once(key, effect)
    assert caught.value.retry_after is not None
    assert 25 < caught.value.retry_after <= 30


async def test_a_failing_done_mark_is_retried_not_the_effect(
    redis_client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    """Redis stalls just after the send: the done mark is retried, the send is not repeated."""

    class FlakyDone(IdempotencyStore):
        failures = 2

        async def done(self, claim: Claim) -> bool:
            if self.failures:
                self.failures -= 1
                raise redis.exceptions.TimeoutError("Timeout reading from socket")
            return await super().done(claim)

    store = FlakyDone(redis_client, prefix=redis_prefix, lease_seconds=5)
    key = store.key("c", "evt-9")
    sends: list[int] = []

    async def send() -> int:
        sends.append(1)
        return len(sends)

    assert await store.run_once(key, send) == 1
    assert store.failures == 0
    assert await store.is_done(key)
    assert await store.run_once(key, send) is None
    assert sends == [1]
