"""R1 and R2: the Redis primary goes away behind Sentinel, under registrations and sends.

Every service of the stack reaches Redis through three private Sentinels (quorum 2) watching
a primary and one replica, both ``appendonly yes`` / ``appendfsync always``
(courier_testing.sentinel), with ``COURIER_REDIS_MIN_REPLICAS`` at its Sentinel default, 1,
and a 500 ms replica timeout.

* R1: the primary is SIGKILLed. Sentinel promotes the replica; the dead node comes back as a
  replica of the new primary (what a StatefulSet pod's start script does).
* R2: a planned ``SENTINEL FAILOVER``. The old primary keeps serving until Sentinel turns it
  into a replica about ten seconds later; the services leave it within half a second.

What Courier promises meanwhile, and what these tests hold it to:

* A registration is answered 201 only once the replica has it (``WAIT``), so every 201 is
  readable after the failover and its welcome is sent. Anything else is a 503 problem with
  ``Retry-After``: Redis unreachable (the primary is dead and not yet replaced), or the
  replicas did not confirm in time (the new primary has no replica until the old one is
  back): "may have been applied". Never a 500, never a hang.
* A welcome goes out only for a registration that stands: the relay publishes what the
  replicas confirmed, so a 503'd registration that the failover took is never welcomed.
* The outbox drains from the new primary (the relay's consumer group was replicated with the
  stream), every queue empties, and duplicates stay within what was in flight: an XACK/XDEL
  or an idempotency ``done`` mark the replica had not received when the primary changed
  costs a republish or one more send.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis

from courier_testing.sentinel import RedisNode, RedisSentinelGroup, redis_sentinel_group
from tests.faults.test_redis_faults import (
    PREFETCH,
    Answer,
    Registrations,
    assert_refusals_are_retryable_problems,
    read_status,
)
from tests.support.faults import FaultStack
from tests.support.ledger import Ledger
from tests.support.sentinel import sentinel_env, sentinel_fault_stack

pytestmark = pytest.mark.fault
_FIXTURES = (redis_sentinel_group, sentinel_env, sentinel_fault_stack)


def _count(check: Callable[[Answer], bool]) -> Callable[[list[Answer]], bool]:
    return lambda answers: sum(check(a) for a in answers) >= 20


def _not_replicated(answer: Answer) -> bool:
    return answer.status == 503 and '"replicas_required"' in answer.body


def assert_survivors(stack: FaultStack, accepted: dict[str, object]) -> None:
    """Every 201 is readable after the failover: none was taken back."""
    statuses = {user_id: read_status(stack.users, user_id) for user_id in accepted}
    missing = {user_id: status for user_id, status in statuses.items() if status != 200}
    assert not missing, f"acknowledged, then gone after the failover: {missing}"


def assert_in_doubt_sends_stand(stack: FaultStack, ledger: Ledger) -> None:
    """A welcome sent for a registration answered 503 went to a user who exists.

    The relay publishes only what the replicas confirmed, so a registration that a failover
    took (applied on the old primary only, answered 503) never had its welcome sent.
    """
    sent, _ = ledger.sends(stack.smtp, stack.http)
    doubtful = sorted({int(user[1:]) for user, _ in sent if user.startswith("~")})
    for index in doubtful:
        email = ledger.in_doubt[index]["email"]
        response = stack.users.get("/v1/users", params={"email": email})
        assert response.status_code == 200, response.text
        assert response.json()["items"], f"welcomed, but its registration is gone: {email}"


def assert_outbox_drained_on(primary: RedisNode) -> None:
    """The new primary's outbox is empty and its consumer group holds nothing pending."""
    client = redis.Redis(port=primary.port, socket_timeout=10)
    try:
        assert client.xlen("courier:outbox") == 0
        pending = client.xpending("courier:outbox", "relay")
        assert pending["pending"] == 0, pending
    finally:
        client.close()


def test_r1_primary_sigkilled_sentinel_promotes_the_replica(
    sentinel_fault_stack: FaultStack, redis_sentinel_group: RedisSentinelGroup
) -> None:
    stack, group = sentinel_fault_stack, redis_sentinel_group
    ledger = stack.ledger("R1 Redis primary SIGKILLed behind Sentinel (WAIT 1) under load")

    with Registrations(ledger, stack.chain.url("user-service")) as load:
        load.wait_until(_count(lambda a: a.status == 201), what="20 registrations first")
        old = group.kill_primary()
        killed_at = time.monotonic()
        new = group.wait_promoted(old)
        promoted_at = time.monotonic()
        load.wait_until(
            lambda answers: (
                sum(_not_replicated(a) and a.started > promoted_at for a in answers) >= 3
            ),
            what="registrations refused by the new primary, which has no replica yet",
        )
        group.rejoin(old)
        group.wait_settled()
        settled_at = time.monotonic()
        load.wait_until(
            _count(lambda a: a.status == 201 and a.started > settled_at),
            what="registrations accepted again once the old primary is a replica",
        )

    answers = load.answers
    refused = assert_refusals_are_retryable_problems(answers)
    assert any(a.started > killed_at and a.ended < promoted_at for a in refused), (
        "registrations were refused while no primary answered"
    )
    assert group.primary() is new
    assert_survivors(stack, dict(ledger.accepted))
    stack.check(ledger, allow_refused=True, duplicate_bound=PREFETCH, recovery_started=settled_at)
    assert_in_doubt_sends_stand(stack, ledger)
    assert_outbox_drained_on(new)


@pytest.mark.matrix
def test_r2_planned_sentinel_failover_under_load(
    sentinel_fault_stack: FaultStack, redis_sentinel_group: RedisSentinelGroup
) -> None:
    stack, group = sentinel_fault_stack, redis_sentinel_group
    ledger = stack.ledger("R2 planned SENTINEL FAILOVER (WAIT 1) under load")

    with Registrations(ledger, stack.chain.url("user-service")) as load:
        load.wait_until(_count(lambda a: a.status == 201), what="20 registrations first")
        old = group.failover()
        new = group.wait_promoted(old)
        promoted_at = time.monotonic()
        group.wait_settled()  # Sentinel turns the old primary into a replica
        settled_at = time.monotonic()
        load.wait_until(
            _count(lambda a: a.status == 201 and a.started > settled_at),
            what="registrations accepted again once the old primary is a replica",
        )

    answers = load.answers
    refused = assert_refusals_are_retryable_problems(answers)
    assert any(_not_replicated(a) and a.started > promoted_at for a in refused), (
        "the new primary refused to promise what no replica had"
    )
    assert group.primary() is new
    assert_survivors(stack, dict(ledger.accepted))
    stack.check(ledger, allow_refused=True, duplicate_bound=PREFETCH, recovery_started=settled_at)
    assert_in_doubt_sends_stand(stack, ledger)
    assert_outbox_drained_on(new)
