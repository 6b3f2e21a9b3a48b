"""F9: the archiver SIGKILLed while it archives, then a double replay sends once.

A burst of registrations whose emails the SMTP provider refuses for good (550) turns into a
stream of dead letters. The dlq-archiver is killed in the middle of archiving them and
restarted: every dead letter must be in the archive exactly once (what it had stored but not
acked comes back and is recognised as a duplicate). Then the provider is fixed and a few dead
letters are replayed twice each, at once and in turn, and one in a burst: each user gets one
email, and each record lists every replay made of it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from courier_common.failpoints import ENV_VAR
from tests.support.archiver import ADMIN
from tests.support.faults import FaultStack
from tests.support.ledger import Contact

pytestmark = pytest.mark.fault

DEAD = 200
KILL_AT = DEAD // 5  # the archiver dies after storing this many, before acking the last
BURST = 6


def all_records(client: httpx.Client) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 500, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/dead-letters", params=params)
        page.raise_for_status()
        body = page.json()
        records += body["items"]
        cursor = body.get("next_cursor")
        if not cursor:
            return records


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def emails_to(fault_stack: FaultStack, address: str) -> int:
    return sum(address in m["rcpt_tos"] for m in fault_stack.smtp.messages)


@pytest.fixture
def fault_env() -> dict[str, dict[str, str]]:
    return {"dlq-archiver": {ENV_VAR: f"archiver.before_ack=kill@{KILL_AT}"}}


def duplicates_recognised(fault_stack: FaultStack) -> float:
    for family in text_string_to_metric_families(fault_stack.chain.metrics_text("dlq-archiver")):
        if family.name == "courier_dead_letters_duplicate":
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    raise AssertionError("dlq-archiver exposes no courier_dead_letters_duplicate_total")


@pytest.mark.matrix
def test_archiver_killed_while_archiving_then_double_replay_sends_once(
    fault_stack: FaultStack,
) -> None:
    ledger = fault_stack.ledger("F9 archiver SIGKILL while archiving")
    archiver = fault_stack.chain.processes["dlq-archiver"]
    archive = redis.Redis.from_url(fault_stack.redis.url)

    def archived() -> int:
        return int(archive.zcard("courier:dlq:idx:time"))

    fault_stack.smtp.fail_next(DEAD, 550, "5.1.1 mailbox unavailable")

    loader = threading.Thread(
        target=lambda: [ledger.register(fault_stack.users) for _ in range(DEAD)]
    )
    loader.start()
    # A random kill rarely lands between a store and its ack, so the failpoint (fault_env)
    # kills the archiver there, at its KILL_AT-th dead letter; it restarts without it.
    assert archiver.proc is not None
    archiver.proc.wait(120)
    at_kill = archived()
    restarted_at = time.monotonic()
    archiver.env.pop(ENV_VAR)
    archiver.start()
    loader.join(120)
    assert not loader.is_alive()
    assert len(ledger.accepted) == DEAD
    assert at_kill < DEAD, "the archiver had archived everything: it was not killed mid-way"

    # Every dead letter is accounted for (the ledger waits for the archive to catch up) ...
    tally = fault_stack.check(ledger, recovery_started=restarted_at)
    assert tally.dead_lettered == DEAD
    with httpx.Client(base_url=archiver.url, headers=ADMIN, timeout=30) as admin:
        # ... archived exactly once: what was stored but not acked came back and was merged.
        records = all_records(admin)
        per_message = Counter(r["message_id"] for r in records)
        assert len(records) == DEAD, f"{len(records)} records for {DEAD} dead letters"
        assert max(per_message.values()) == 1, "a dead letter archived twice"
        assert {r["user_id"] for r in records} == set(ledger.accepted)
        assert duplicates_recognised(fault_stack) >= 1, "no redelivery of a stored dead letter"

        # Fix the provider, then replay: two records twice at once, one twice in turn (the
        # second after the first was sent), one in a burst of BURST at once.
        fault_stack.smtp.clear_failures()
        record_of = {r["user_id"]: r["id"] for r in records}
        contacts = list(ledger.accepted.values())
        at_once, in_turn, burst = contacts[:2], contacts[2], contacts[3]
        replays = {contact.email: 2 for contact in (*at_once, in_turn)} | {burst.email: BURST}

        def replay(contact: Contact) -> str:
            response = admin.post(f"/v1/dead-letters/{record_of[contact.user_id]}/replay")
            assert response.status_code == 202, response.text
            return str(response.json()["replay_id"])

        def together(contacts: list[Contact]) -> list[str]:
            """Replay each of *contacts*, every request let go at the same moment."""
            start = threading.Barrier(len(contacts))

            def go(contact: Contact) -> str:
                start.wait(30)
                return replay(contact)

            with ThreadPoolExecutor(len(contacts)) as pool:
                return list(pool.map(go, contacts))

        replay_ids = together(at_once * 2) + together([burst] * BURST)
        replay_ids.append(replay(in_turn))
        wait_until(lambda: emails_to(fault_stack, in_turn.email) >= 1, 60, "the replayed email")
        replay_ids.append(replay(in_turn))
        assert len(set(replay_ids)) == sum(replays.values())
        replayed = [*at_once, in_turn, burst]
        wait_until(
            lambda: all(emails_to(fault_stack, c.email) >= 1 for c in replayed),
            60,
            "the replayed emails",
        )

    fault_stack.wait_drained()  # every replay is handled before anything is counted
    ledger.scenario = "F9 double replay of dead letters after the archiver crash"
    tally = fault_stack.check(ledger, duplicate_bound=0)
    assert tally.sent == len(replayed)
    assert tally.dead_lettered == DEAD - len(replayed)
    assert {c.email: emails_to(fault_stack, c.email) for c in replayed} == dict.fromkeys(replays, 1)

    # The operator's view: each record lists every one of its replays.
    with httpx.Client(base_url=archiver.url, headers=ADMIN, timeout=30) as admin:
        history = {
            c.email: len(admin.get(f"/v1/dead-letters/{record_of[c.user_id]}").json()["replays"])
            for c in replayed
        }
    assert history == replays, f"replays missing from the records' history: {history}"
