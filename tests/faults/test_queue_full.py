"""F10: the work queue is full (``x-max-length`` with reject-publish) while nobody consumes.

The broker nacks what does not fit; the outbox relay must keep each nacked event (it is owed)
and acknowledge only what the broker confirmed. Once the worker drains the queue, the relay's
retries get through and every registration's notifications go out.
"""

from __future__ import annotations

import time

import pytest

from notification_service.routes import USER_EVENTS_QUEUE
from tests.support.chain import SERVICES
from tests.support.faults import FaultStack
from tests.support.load import RegistrationLoad

pytestmark = pytest.mark.fault

MAX_LENGTH = 20
REGISTRATIONS = 80
WORK_QUEUE = USER_EVENTS_QUEUE


@pytest.fixture
def fault_env() -> dict[str, dict[str, str]]:
    # Every service declares the same topology, so every one gets the cap.
    return {name: {"COURIER_WORK_QUEUE_MAX_LENGTH": str(MAX_LENGTH)} for name in SERVICES}


def nacked(fault_stack: FaultStack) -> float:
    """user-service's ``courier_messages_published_total{outcome="nacked"}``, all exchanges."""
    total = 0.0
    for line in fault_stack.chain.metrics_text("user-service").splitlines():
        if line.startswith("courier_messages_published_total{") and 'outcome="nacked"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_f10_full_queue_nacks_and_the_outbox_keeps_the_events(fault_stack: FaultStack) -> None:
    ledger = fault_stack.ledger("F10 work queue full (reject-publish)")
    worker = fault_stack.chain.processes["notification-service"]
    assert worker.stop() == 0
    load = RegistrationLoad(
        ledger, fault_stack.users, channels=("email", "sms"), count=REGISTRATIONS
    ).start()
    load.stop()
    assert len(ledger.accepted) == REGISTRATIONS

    # Everything is either in the queue (confirmed, so removed from the outbox) or still in
    # the outbox: nothing was acknowledged that the broker did not take, nothing went twice.
    deadline = time.monotonic() + 60
    while True:
        depth = fault_stack.queue_depths().get(WORK_QUEUE, 0)
        backlog = fault_stack.outbox_backlog()
        refused = nacked(fault_stack)
        settled = depth >= MAX_LENGTH and depth + backlog == REGISTRATIONS and refused > 0
        if settled or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert refused > 0, "the relay saw no nack from the full queue"
    assert depth >= MAX_LENGTH, f"the queue holds {depth}, below its cap of {MAX_LENGTH}"
    assert backlog > 0, "the outbox let go of events the full queue refused"
    assert depth + backlog == REGISTRATIONS, (
        f"queue {depth} + outbox {backlog} != {REGISTRATIONS} registrations"
    )
    print(f"F10: queue {depth}, outbox {backlog:.0f}, nacks so far {refused:.0f}")

    draining = time.monotonic()
    worker.start()
    fault_stack.check(ledger, duplicate_bound=0, recovery_started=draining)
