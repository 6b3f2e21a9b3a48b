"""F8: a poison handler, a send that fails retryably every time, ends in the archive.

One user's SMS provider answers 503 to every request. The message must go through exactly
``COURIER_RETRY_MAX_ATTEMPTS`` attempts, spaced by the retry tiers (within ±20%), and then be
dead-lettered and archived; the user's email goes out once, and nobody else is held up.

The tiers are longer than the suite's usual ones (all three services share them: they declare
the same topology), so ±20% measures the broker's TTL tiers, not scheduling noise.
"""

from __future__ import annotations

import itertools
import json
import time
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.support.archiver import ADMIN
from tests.support.chain import SERVICES
from tests.support.faults import FaultStack

pytestmark = pytest.mark.fault

DELAYS = [1.0, 2.0, 4.0]
MAX_ATTEMPTS = 4
TOLERANCE = 0.2
BYSTANDERS = 5


@pytest.fixture
def fault_env() -> dict[str, dict[str, str]]:
    policy = {
        "COURIER_RETRY_DELAYS_SECONDS": json.dumps(DELAYS),
        "COURIER_RETRY_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
    }
    return {service: dict(policy) for service in SERVICES}


def archived_for(archiver_url: str, user_id: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{archiver_url}/v1/dead-letters", params={"limit": 500}, headers=ADMIN, timeout=10
    )
    response.raise_for_status()
    return [r for r in response.json()["items"] if r.get("user_id") == user_id]


def wait_archived(archiver_url: str, user_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = archived_for(archiver_url, user_id)
        if found:
            assert len(found) == 1, f"archived more than once: {found}"
            return found[0]
        time.sleep(0.5)
    pytest.fail(f"no dead letter for user {user_id} within {timeout}s")


def test_poison_message_dead_lettered_after_exactly_max_attempts(fault_stack: FaultStack) -> None:
    ledger = fault_stack.ledger("F8 poison handler: SMS provider always 503")
    fault_stack.http.fail_next(1000, 503, path="/sms")
    poison = ledger.register(fault_stack.users, channels=("email", "sms"))
    assert poison is not None
    for _ in range(BYSTANDERS):
        ledger.register(fault_stack.users, channels=("email",))

    archiver_url = fault_stack.chain.url("dlq-archiver")
    record = wait_archived(archiver_url, poison.user_id, timeout=sum(DELAYS) + 60)
    fault_stack.wait_drained()  # nothing of it is left in a work or retry queue
    tally = fault_stack.check(ledger)
    assert tally.dead_lettered == 1, "only the poison SMS is in the archive"

    attempts = [
        r
        for r in fault_stack.http.requests
        if r["path"] == "/sms" and isinstance(r["body"], dict) and r["body"]["to"] == poison.phone
    ]
    assert [r["status"] for r in attempts] == [503] * MAX_ATTEMPTS
    assert record["attempts"] == MAX_ATTEMPTS
    assert f"gave up after {MAX_ATTEMPTS} attempts" in record["reason"]
    sent_at = [datetime.fromisoformat(r["received_at"]) for r in attempts]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(sent_at)]
    for gap, tier in zip(gaps, DELAYS, strict=True):
        assert abs(gap - tier) <= TOLERANCE * tier, f"gaps {gaps} are not the tiers {DELAYS}"
    emails = [m for m in fault_stack.smtp.messages if poison.email in m["rcpt_tos"]]
    assert len(emails) == 1, "the email went out once, not once per attempt"
