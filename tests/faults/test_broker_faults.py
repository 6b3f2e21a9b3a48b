"""F2 to F5: the broker crashes, restarts, hangs and stays away while users register.

Registrations never wait for the broker (the outbox is in Redis), so every one answers 201;
what the broker held or was being handed is what the ledger checks afterwards. A delivery
the worker held when the broker went away comes back; its email may go out twice (the SMS
is the provider's replay of the same Idempotency-Key), so duplicates stay within the prefetch.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.support.faults import FaultStack
from tests.support.load import RegistrationLoad

pytestmark = pytest.mark.fault

#: notification-service's default prefetch: the most deliveries the broker's failure strands.
PREFETCH = 32
#: The AMQP heartbeat the fault stack gives every service.
HEARTBEAT = 5.0
#: What the issue demands of POST /v1/users while the broker hangs.
REGISTRATION_BOUND = 2.0
CHANNELS = ("email", "sms")


def broker_state(url: str) -> str:
    """What a service's /readyz says of its broker connection ("connected"/"disconnected")."""
    try:
        return str(httpx.get(f"{url}/readyz", timeout=5).json().get("broker"))
    except httpx.HTTPError as exc:
        return f"unreachable: {exc!r}"


def log_events(path_text: str) -> list[str]:
    """The ``event`` of every JSON log line in *path_text*."""
    events = []
    for line in path_text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "event" in record:
            events.append(str(record["event"]))
    return events


F2 = "F2 broker SIGKILL and restart during registrations"


@pytest.mark.parametrize(
    ("scenario", "halt", "fault_broker"),
    [
        pytest.param(F2, "kill", "3.10", id="f2-kill"),
        pytest.param(
            "F3 graceful broker restart during registrations",
            "stop",
            "3.10",
            id="f3-graceful",
            marks=pytest.mark.matrix,
        ),
        pytest.param(F2, "kill", "4.0", id="V4-f2-kill-rabbitmq4.0", marks=pytest.mark.matrix),
    ],
    indirect=["fault_broker"],
)
def test_broker_restarted_during_registrations(
    fault_stack: FaultStack, scenario: str, halt: str
) -> None:
    """F2 (SIGKILL) and F3 (graceful stop): registrations go on; nothing is lost after."""
    ledger = fault_stack.ledger(scenario)
    load = RegistrationLoad(ledger, fault_stack.users, channels=CHANNELS, pause=0.02).start()
    load.wait_for(30)
    getattr(fault_stack.broker, halt)()
    load.wait_for(len(load.answers) + 20)  # registrations go on while it is down
    restarting = time.monotonic()
    fault_stack.broker.start()
    load.wait_for(len(load.answers) + 30)
    load.stop()
    fault_stack.check(ledger, duplicate_bound=PREFETCH, recovery_started=restarting)


@pytest.mark.matrix
def test_f4_hung_broker_is_detected_by_heartbeat(fault_stack: FaultStack) -> None:
    """SIGSTOP for 30 s: the port still accepts, nothing answers. Only heartbeats notice."""
    ledger = fault_stack.ledger("F4 broker hung (SIGSTOP 30 s)")
    processes = fault_stack.chain.processes
    watched = ("notification-service", "user-service", "dlq-archiver")
    log_marks = {name: processes[name].log_path.stat().st_size for name in watched}
    load = RegistrationLoad(ledger, fault_stack.users, channels=CHANNELS, pause=0.05).start()
    load.wait_for(30)

    detected: dict[str, float] = {}
    paused_at = time.monotonic()
    fault_stack.broker.pause()
    try:
        while (elapsed := time.monotonic() - paused_at) < 30:
            for name in watched:
                if name not in detected and broker_state(processes[name].url) == "disconnected":
                    detected[name] = round(elapsed, 1)
            time.sleep(0.5)
    finally:
        resumed_at = time.monotonic()
        fault_stack.broker.resume()
    load.wait_for(len(load.answers) + 30)
    load.stop()

    during = load.between(paused_at, resumed_at)
    assert len(during) >= 20, f"only {len(during)} registrations while the broker hung"
    slow = [round(a.seconds, 2) for a in during if a.seconds > REGISTRATION_BOUND]
    assert not slow, f"registrations slower than {REGISTRATION_BOUND} s while hung: {slow[:10]}"
    assert {a.status for a in during} == {201}
    # The hang was noticed while it lasted, by heartbeat (nothing else closes an idle
    # consumer's connection): each service said so on /readyz and in its log.
    print(f"F4: broker seen down after {detected} s (heartbeat {HEARTBEAT} s)")
    assert set(detected) == set(watched), f"hang detected only by {detected} within 30 s"
    for name in watched:
        with processes[name].log_path.open(encoding="utf-8", errors="replace") as log:
            log.seek(log_marks[name])
            events = log_events(log.read())
        assert "amqp_connection_lost" in events, f"{name} logged no lost connection"
        assert "amqp_reconnected" in events, f"{name} logged no reconnect"

    fault_stack.check(ledger, duplicate_bound=PREFETCH, recovery_started=resumed_at)


@pytest.mark.matrix
def test_f5_broker_down_for_a_minute_during_registrations(fault_stack: FaultStack) -> None:
    ledger = fault_stack.ledger("F5 broker down 60 s during registrations")
    load = RegistrationLoad(ledger, fault_stack.users, channels=CHANNELS, pause=0.05).start()
    load.wait_for(30)
    fault_stack.broker.kill()
    down_at = time.monotonic()
    backlog = [0.0]
    while time.monotonic() - down_at < 60:
        time.sleep(2)
        backlog.append(fault_stack.outbox_backlog())
    restarting = time.monotonic()
    fault_stack.broker.start()
    load.wait_for(len(load.answers) + 30)
    load.stop()

    during = load.between(down_at, restarting)
    assert len(during) >= 100, f"only {len(during)} registrations while the broker was down"
    # The outbox held what the broker could not take: it grew through the outage ...
    assert max(backlog) >= len(during) / 2, f"the outbox did not buffer: {backlog}"
    # ... and check() waits for it to drain to 0 (courier_outbox_backlog) after the return.
    tally = fault_stack.check(ledger, duplicate_bound=PREFETCH, recovery_started=restarting)
    assert fault_stack.outbox_backlog() == 0
    print(f"F5: outbox peaked at {max(backlog):.0f}, recovered in {tally.recovery_seconds} s")
