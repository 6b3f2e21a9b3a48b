"""At-least-once in, effectively-once out: claim, do the work, mark done.

Per key (consumer, event id, channel)::

    SET key processing:<token> NX EX <lease>   -> claimed: do the work
    ... work succeeds ...  SET key done EX <retention>
    ... work fails ...     DEL key (only if we still own the claim)

``done`` means the effect already happened: skip and ack. A live claim held by another
worker means "try later" (:class:`RetryableError`). A worker that dies holding a claim loses
nothing: its message is redelivered and the claim expires after the lease. Claiming ``done``
before the work (SET NX done) would lose the message when the worker dies mid-work; that is
why the claim and the done mark are separate.

Behind Sentinel neither the claim nor the ``done`` mark waits for the replicas (no ``WAIT``):
a failover that loses a ``done`` mark costs one more send, and only if the same event comes
again, which takes a second loss (the relay's acknowledgement of it, or the broker's of the
delivery) in the same few milliseconds of unreplicated writes. That is a duplicate within the
documented bound (what was in flight), at no cost on the path of every message.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prometheus_client import Counter
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from courier_common.batching import CommandBatcher
from courier_common.failpoints import failpoint
from courier_common.logging import get_logger
from courier_common.messaging.retry import RetryableError
from courier_common.metrics import MessagingMetrics

T = TypeVar("T")

log = get_logger(__name__)

DONE = b"done"
_RELEASE_IF_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_DONE_IF_OWNER_OR_FREE = """
local current = redis.call('GET', KEYS[1])
if current == false or current == ARGV[1] then
  redis.call('SET', KEYS[1], 'done', 'EX', ARGV[2])
  return 1
end
return 0
"""


class ClaimResult(enum.Enum):
    CLAIMED = "claimed"
    DONE = "done"
    BUSY = "busy"


@dataclass(slots=True)
class Claim:
    key: str
    token: str
    result: ClaimResult


@dataclass(slots=True)
class _SkipTracker:
    ran: int = 0
    skipped: int = 0


_tracker: contextvars.ContextVar[_SkipTracker | None] = contextvars.ContextVar(
    "courier_idempotency_tracker", default=None
)


def track_skips() -> _SkipTracker:
    """Start counting, in this context, the effects run and skipped by :meth:`run_once`.

    The consumer runner uses it to tell a duplicate delivery (every effect skipped) from
    a handled one, without the handler having to say so.
    """
    tracker = _SkipTracker()
    _tracker.set(tracker)
    return tracker


@dataclass(slots=True)
class IdempotencyStore:
    """The claim / done / release protocol on Redis."""

    redis: Redis
    prefix: str = "courier:"
    lease_seconds: float = 60.0
    retention_seconds: int = 7 * 24 * 3600
    metrics: MessagingMetrics | None = None
    #: How long `run_once` waits out a claim held by someone else; None: one lease.
    busy_wait_seconds: float | None = None

    # Sent as EVALSHA (the script body only if Redis does not know it yet): every message of
    # every consumer runs one of them.
    _done_script: AsyncScript = field(init=False, repr=False)
    _release_script: AsyncScript = field(init=False, repr=False)
    #: The claims and done marks of concurrent deliveries share pipelines (one round trip).
    _batch: CommandBatcher = field(init=False, repr=False)
    #: The claim counter's children, resolved once.
    _claims: dict[ClaimResult, Counter] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.metrics is not None:
            self.metrics.use_idempotency()
            self._claims = {
                result: self.metrics.idempotency_claims.labels(result.value)
                for result in ClaimResult
            }
        self._done_script = self.redis.register_script(_DONE_IF_OWNER_OR_FREE)
        self._release_script = self.redis.register_script(_RELEASE_IF_OWNER)
        self._batch = CommandBatcher(self.redis)

    def key(self, *parts: str) -> str:
        return self.prefix + "idem:" + ":".join(parts)

    async def claim(self, key: str) -> Claim:
        claim = await self._try_claim(key)
        if self.metrics is not None:
            self._claims[claim.result].inc()
        return claim

    async def _try_claim(self, key: str) -> Claim:
        token = "processing:" + secrets.token_hex(8)
        lease_ms = str(max(1, round(self.lease_seconds * 1000)))
        # SET NX GET (Redis 7): claimed (nil) or what holds it, in one command.
        current = await self._batch.execute("SET", key, token, "NX", "PX", lease_ms, "GET")
        if current is None:
            result = ClaimResult.CLAIMED
        else:
            result = ClaimResult.DONE if _as_bytes(current) == DONE else ClaimResult.BUSY
        return Claim(key=key, token=token, result=result)

    async def _wait_out(self, key: str) -> Claim:
        """Poll a busy claim until it is ours or done, for at most ``busy_wait_seconds``.

        A claim is busy while another worker holds its lease, or while the lease of a worker
        that died holding it runs out. Both end within one lease, so waiting that long turns
        the usual case (a crash, then the redelivery) into a plain claim, instead of spending
        the message's retry budget on a lease that nobody will ever complete.
        """
        wait = self.lease_seconds if self.busy_wait_seconds is None else self.busy_wait_seconds
        deadline = time.monotonic() + wait
        pause = 0.05
        claim = Claim(key=key, token="", result=ClaimResult.BUSY)
        while time.monotonic() < deadline:
            await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            claim = await self._try_claim(key)
            if claim.result is not ClaimResult.BUSY:
                break
            pause = min(pause * 2, 1.0)
        if self.metrics is not None:
            self._claims[claim.result].inc()
        return claim

    async def done(self, claim: Claim) -> bool:
        """Mark the work done. False if our lease had passed to another worker meanwhile."""
        marked = await self._script(
            self._done_script, claim.key, claim.token, str(self.retention_seconds)
        )
        return bool(marked)

    async def release(self, claim: Claim) -> None:
        """Give the claim back after a failure, so the retry can claim it at once."""
        await self._script(self._release_script, claim.key, claim.token)

    async def _script(self, script: AsyncScript, key: str, *args: str) -> Any:
        """EVALSHA in the next batch; loads the script once if Redis does not know it."""
        try:
            return await self._batch.execute("EVALSHA", script.sha, 1, key, *args)
        except NoScriptError:  # a restarted or failed-over Redis forgot its scripts
            await self.redis.script_load(script.script)
            return await self._batch.execute("EVALSHA", script.sha, 1, key, *args)

    async def is_done(self, key: str) -> bool:
        return _as_bytes(await self.redis.get(key)) == DONE

    async def run_once(self, key: str, effect: Callable[[], Awaitable[T]]) -> T | None:
        """Run ``effect`` unless it already ran for ``key``; None when it was skipped.

        While another worker holds the claim it waits (see `_wait_out`) for that worker to
        finish or for its lease to run out; raises :class:`RetryableError`, with
        ``retry_after`` the lease's remaining time, if the claim is still held after that.
        """
        claim = await self.claim(key)
        if claim.result is ClaimResult.BUSY:
            claim = await self._wait_out(key)
        tracker = _tracker.get()
        if claim.result is ClaimResult.DONE:
            if tracker is not None:
                tracker.skipped += 1
            return None
        if claim.result is ClaimResult.BUSY:
            remaining_ms = await self.redis.pttl(key)
            raise RetryableError(
                f"another worker is handling {key!r}",
                retry_after=max(remaining_ms, 0) / 1000 if remaining_ms else None,
            )
        failpoint("idempotency.before_effect")
        try:
            result = await effect()
        except BaseException:
            await self.release(claim)
            raise
        failpoint("idempotency.after_effect")
        await self._mark_done(claim)
        if tracker is not None:
            tracker.ran += 1
        return result

    async def _mark_done(self, claim: Claim) -> None:
        """Mark the claim done, retrying a failing Redis for as long as the lease runs.

        The effect has happened: if marking it failed at once, the message would be retried
        and the effect repeated (an email sent twice after a Redis stall). Only when Redis stays
        away for the whole lease does the error propagate; the lease then lets the retry in.
        """
        deadline = time.monotonic() + self.lease_seconds
        pause = 0.1
        while True:
            try:
                await self.done(claim)
                return
            except RedisError as exc:
                if time.monotonic() + pause >= deadline:
                    raise
                log.warning("idempotency_done_retrying", key=claim.key, error=repr(exc))
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)


def _as_bytes(value: object) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    return str(value).encode()
