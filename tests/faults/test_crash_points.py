"""F1 at each crash point: the notification worker SIGKILLed by a failpoint, then restarted.

The three points of the idempotency protocol where a worker can die (see
``courier_common/failpoints.py``): before the send, after the send but before the key is
marked done, after done but before the ack. The worker runs with prefetch 1, so what is in
flight at the crash is exactly the one message at the failpoint: its email and its SMS.

* before send: the claim dies with the worker; the redelivery waits out its lease and sends.
  Nothing was sent, so nothing is sent twice.
* after send, before done: the send is not recorded, so the redelivery sends again. That is
  the duplicate at-least-once allows: at most the message's email (an SMS re-send carries
  the same Idempotency-Key and is the provider's replay, not a second text).
* after done, before ack: every send is marked done, so the redelivery sends nothing and is
  acked as a duplicate.

F1 "at random during load" (prefetch 32) is tests/faults/test_worker_crash.py.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from courier_common.failpoints import ENV_VAR
from tests.support.faults import RABBITMQ_RELEASES, FaultStack
from tests.support.processes import ServiceProcess

pytestmark = pytest.mark.fault

#: Registrations (email + SMS each); the failpoints fire on the 4th message.
USERS = 12


@dataclass(frozen=True)
class CrashPoint:
    where: str
    failpoints: str
    #: duplicates allowed: the sends in flight at the crash that can be re-sent unrecognised
    duplicate_bound: int
    #: the redelivery repeats a send that happened (a duplicate or a provider replay)
    resends: bool


BEFORE_SEND = CrashPoint("before send", "idempotency.before_effect=kill@7", 0, resends=False)
AFTER_SEND = CrashPoint(
    "after send, before done", "idempotency.after_effect=kill@7", 1, resends=True
)
AFTER_DONE = CrashPoint("after done, before ack", "consumer.before_ack=kill@4", 0, resends=False)


@pytest.fixture
def fault_env(crash_point: CrashPoint) -> dict[str, dict[str, str]]:
    return {"notification-service": {ENV_VAR: crash_point.failpoints, "COURIER_AMQP_PREFETCH": "1"}}


def wait_exit(process: ServiceProcess, timeout: float) -> int:
    assert process.proc is not None
    deadline = time.monotonic() + timeout
    while process.proc.poll() is None:
        if time.monotonic() > deadline:
            pytest.fail(f"{process.name} did not die at its failpoint:\n{process.logs()}")
        time.sleep(0.1)
    return process.proc.returncode


def consumed(metrics_text: str, outcome: str) -> float:
    """courier_messages_consumed_total for one runner outcome, summed over its other labels."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        if family.name == "courier_messages_consumed"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels.get("outcome") == outcome
    )


@pytest.mark.parametrize(
    "crash_point",
    [
        pytest.param(BEFORE_SEND, id="before-send", marks=pytest.mark.matrix),
        pytest.param(AFTER_SEND, id="after-send-before-done"),
        pytest.param(AFTER_DONE, id="after-done-before-ack", marks=pytest.mark.matrix),
    ],
)
@pytest.mark.parametrize("fault_broker", RABBITMQ_RELEASES, indirect=True)
def test_worker_killed_at_crash_point(fault_stack: FaultStack, crash_point: CrashPoint) -> None:
    ledger = fault_stack.ledger(f"F1 worker SIGKILL {crash_point.where}")
    worker = fault_stack.chain.processes["notification-service"]
    for _ in range(USERS):
        ledger.register(fault_stack.users, channels=("email", "sms"))

    assert wait_exit(worker, timeout=90) == -signal.SIGKILL
    assert "failpoint_kill" in worker.logs(), "the worker died, but not at the failpoint"
    worker.env.pop(ENV_VAR)
    restarted_at = time.monotonic()
    worker.start()

    fault_stack.wait_drained()  # the redelivery is handled before anything is counted
    tally = fault_stack.check(
        ledger, duplicate_bound=crash_point.duplicate_bound, recovery_started=restarted_at
    )
    resent = tally.duplicates + tally.provider_replays
    if crash_point.resends:
        assert resent >= 1, "the send made before the crash was not repeated"
    else:
        assert resent == 0, f"{resent} sends repeated, though none was in flight unrecorded"
    if crash_point is AFTER_DONE:
        duplicates = consumed(fault_stack.chain.metrics_text("notification-service"), "duplicate")
        assert duplicates >= 1, "the redelivered message was not recognised as done"
