"""F1: the notification worker SIGKILLed during a burst of registrations; nothing is lost."""

from __future__ import annotations

import os
import random
import secrets
import threading
import time

import pytest

from tests.support.faults import FaultStack

pytestmark = pytest.mark.fault

#: notification-service's default prefetch: the most deliveries a killed worker can hold.
PREFETCH = 32


def test_worker_killed_at_random_during_load(fault_stack: FaultStack) -> None:
    ledger = fault_stack.ledger("F1 worker SIGKILL at random during load")
    worker = fault_stack.chain.processes["notification-service"]
    done = threading.Event()

    def load() -> None:
        for _ in range(150):
            ledger.register(fault_stack.users, channels=("email", "sms"))
        done.set()

    # Somewhere inside the burst, from a seed that is printed (shown when the test fails) and
    # kept in the report row, and that COURIER_FAULT_SEED replays.
    seed = int(os.environ.get("COURIER_FAULT_SEED") or secrets.randbits(32))
    delay = random.Random(seed).uniform(0.5, 2.0)
    print(f"F1 random kill after {delay:.3f} s (COURIER_FAULT_SEED={seed} replays it)")
    ledger.scenario += f" (kill at {delay:.3f} s, COURIER_FAULT_SEED={seed})"
    loader = threading.Thread(target=load)
    loader.start()
    time.sleep(delay)
    worker.kill()
    restarted_at = time.monotonic()
    worker.start()
    loader.join(120)
    assert done.is_set(), "the registrations finished"
    fault_stack.check(ledger, duplicate_bound=PREFETCH, recovery_started=restarted_at)
