"""F6 and F7: user-service's own store, Redis, dies or stalls under registrations and sends.

Every service of the fault stack shares the private Redis (AOF on), so a Redis fault hits the
API, the outbox relay, the notifier's idempotency claims and the archive at once.

* F6: Redis is SIGKILLed and restarted on its port with its append-only file.
* F7: Redis stalls (``CLIENT PAUSE <ms> ALL``): every command waits, the TCP port still accepts.

What Courier promises meanwhile, and what these tests hold it to:

* A registration is answered 201 (it is in A: its user and outbox entry were written in one
  Lua script) or 503 ``application/problem+json`` with ``Retry-After`` (Redis did not answer:
  nothing was written, the client may retry). Never a 500, never a hang: user-service's Redis
  client gives up after its socket timeout (``COURIER_OUTBOX_BLOCK_MS`` + 10 s).
* A 201 is exactly as durable as Redis' ``appendfsync`` makes it (the test reads the policy
  back from the server). With ``always`` the AOF is written and fsynced before Redis replies:
  nothing acknowledged is lost, even by a machine crash; the matrix proves it for a SIGKILL.
  With ``everysec`` (the PrivateRedis default, and Redis') the AOF is written before the reply
  except while the once-a-second background fsync runs: Redis then postpones the write (up to
  2 s) and still replies. So a SIGKILL of Redis itself, not only a machine crash, can lose the
  registrations acknowledged in the last second or two: user and event together (the AOF
  replays a Lua script whole or not at all), never one without the other. The everysec test
  asserts exactly that: anything lost was acknowledged just before the crash and is gone
  whole; whatever survived is sent or dead-lettered. When nothing was lost (the usual case on
  a quiet disk) the strict ledger applies.
* Every 201 that survived is sent or dead-lettered once Redis is back; the services reconnect
  by themselves. The first request on each pooled connection that died with the old server
  gets a 503 as well (redis-py does not retry a command that may have run).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from courier_testing.private_services import PrivateRedis
from tests.support.faults import FaultStack
from tests.support.ledger import Ledger
from user_service.models import email_key

pytestmark = pytest.mark.fault

#: notification-service's default prefetch: the most sends in flight when Redis goes away.
PREFETCH = 32
#: How long before a SIGKILL a write acknowledged under ``appendfsync everysec`` may still be
#: unwritten: Redis postpones the AOF write (and still replies) for up to 2 s while a background
#: fsync runs; the rest is slack for a loaded machine.
EVERYSEC_LOSS_WINDOW = 10.0
#: user-service's Redis socket timeout in the fault stack: COURIER_OUTBOX_BLOCK_MS (50 ms) + 10 s
#: (user_service.main). A registration waits at most about this long for a stalled Redis.
USER_SERVICE_REDIS_TIMEOUT = 10.05


@dataclass(frozen=True)
class Answer:
    """One registration attempt as the client saw it (status 0: no HTTP answer at all)."""

    started: float
    ended: float
    status: int
    content_type: str
    retry_after: str | None
    body: str
    user_id: str | None = None


class Registrations:
    """Registers users (email + SMS) from a few threads until stopped; keeps every answer.

    Each 201 enters the ledger's A; anything else is in ``ledger.refused`` and here, with the
    headers a client would act on.
    """

    def __init__(self, ledger: Ledger, url: str, *, threads: int = 2, pause: float = 0.02):
        self.ledger = ledger
        self.url = url
        self.pause = pause
        self._answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"registrations-{i}", daemon=True)
            for i in range(threads)
        ]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self._stop.is_set():
                payload = self.ledger.new_payload(("email", "sms"))
                started = time.monotonic()
                try:
                    response = client.post("/v1/users", json=payload)
                except httpx.HTTPError as exc:
                    self.ledger.record_in_doubt(payload)
                    answer = Answer(started, time.monotonic(), 0, "", None, repr(exc))
                else:
                    contact = self.ledger.record(payload, response)
                    answer = Answer(
                        started,
                        time.monotonic(),
                        response.status_code,
                        response.headers.get("content-type", ""),
                        response.headers.get("retry-after"),
                        response.text,
                        contact.user_id if contact else None,
                    )
                with self._lock:
                    self._answers.append(answer)
                self._stop.wait(self.pause)

    def __enter__(self) -> Registrations:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)
        assert not any(t.is_alive() for t in self._threads), "a registration never returned"

    @property
    def answers(self) -> list[Answer]:
        with self._lock:
            return list(self._answers)

    def wait_until(
        self, check: Callable[[list[Answer]], bool], *, what: str, timeout: float = 90
    ) -> None:
        deadline = time.monotonic() + timeout
        while not check(self.answers):
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.1)


def assert_refusals_are_retryable_problems(answers: list[Answer]) -> list[Answer]:
    """Every answer is a 201 or a 503 problem with Retry-After; returns the 503s."""
    unanswered = [a for a in answers if a.status == 0]
    assert not unanswered, f"registrations got no answer: {[a.body for a in unanswered[:3]]}"
    other = [(a.status, a.body[:200]) for a in answers if a.status not in (201, 503)]
    assert not other, f"answers other than 201 or 503: {other[:5]}"
    refused = [a for a in answers if a.status == 503]
    for answer in refused:
        assert answer.content_type == "application/problem+json", answer
        problem = json.loads(answer.body)
        assert problem["status"] == 503, problem
        assert problem["title"] == "Storage unavailable", problem
        assert answer.retry_after is not None, answer
        assert answer.retry_after.isdigit(), answer
    return refused


def redis_config(port: int, name: str) -> str:
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=10, decode_responses=True)
    try:
        value: dict[str, str] = client.config_get(name)  # type: ignore[assignment]
        return value[name]
    finally:
        client.close()


def read_status(client: httpx.Client, user_id: str) -> int:
    """GET the user; a 503 (a pooled connection that died with the old server) is read again."""
    for _ in range(5):
        status = client.get(f"/v1/users/{user_id}").status_code
        if status != 503:
            return status
        time.sleep(0.2)
    return status


@pytest.fixture
def private_redis(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PrivateRedis]:
    """The fault stack's Redis (AOF on) with the ``appendfsync`` policy a test asks for.

    Overrides the plugin's fixture in this module: ``everysec`` (its default) unless a test
    parametrizes it indirectly.
    """
    server = PrivateRedis(
        tmp_path / "redis", appendonly=True, appendfsync=getattr(request, "param", "everysec")
    )
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.mark.parametrize(
    "private_redis",
    [
        pytest.param("everysec", id="everysec"),
        pytest.param("always", id="always", marks=pytest.mark.matrix),
    ],
    indirect=True,
)
def test_redis_killed_with_aof_keeps_what_it_acknowledged(
    fault_stack: FaultStack, private_redis: PrivateRedis
) -> None:
    server = private_redis
    assert redis_config(server.port, "appendonly") == "yes"
    fsync = redis_config(server.port, "appendfsync")  # what the server runs with, not asked
    assert fsync == server.appendfsync
    ledger = fault_stack.ledger(f"F6 Redis SIGKILL (AOF, appendfsync {fsync}) under load")
    users = fault_stack.users

    with Registrations(ledger, fault_stack.chain.url("user-service")) as load:
        load.wait_until(
            lambda answers: sum(a.status == 201 for a in answers) >= 20,
            what="20 registrations before the kill, their sends in flight",
        )
        last = ledger.register(users, channels=("email", "sms"))
        last_acknowledged = time.monotonic()
        assert last is not None, "the registration just before the kill was accepted"
        server.kill()
        killed_at = time.monotonic()
        load.wait_until(
            lambda answers: sum(a.status == 503 and a.started > killed_at for a in answers) >= 5,
            what="registrations refused while Redis is down",
        )
        server.start()  # same port, same data directory: the AOF is replayed
        restarted_at = time.monotonic()
        load.wait_until(
            lambda answers: (
                sum(a.status == 201 and a.started > restarted_at for a in answers) >= 20
            ),
            what="registrations accepted again after the restart, nobody restarting user-service",
        )

    refused = assert_refusals_are_retryable_problems(load.answers)
    assert refused, "the outage was seen by registrations"
    statuses = {user_id: read_status(users, user_id) for user_id in ledger.accepted}
    assert set(statuses.values()) <= {200, 404}, statuses
    vanished = {user_id for user_id, status in statuses.items() if status == 404}
    acknowledged_at = {a.user_id: a.ended for a in load.answers if a.user_id}
    acknowledged_at[last.user_id] = last_acknowledged
    assert all(acknowledged_at[u] < killed_at for u in vanished), "lost after the restart"
    assert_lost_whole(server.port, ledger, vanished)

    if fsync == "always":
        assert statuses[last.user_id] == 200, "the user written just before the kill"
        assert not vanished, "appendfsync always: every acknowledged write survives a crash"
    if not vanished:
        # Everything acknowledged survived, the user written just before the kill included:
        # the strict ledger, lost = 0.
        fault_stack.check(
            ledger, allow_refused=True, duplicate_bound=PREFETCH, recovery_started=restarted_at
        )
        return
    # everysec, and Redis had not yet written the tail of its AOF: those registrations are
    # gone (user and event together), and only ones acknowledged just before the crash.
    window = [killed_at - acknowledged_at[u] for u in vanished]
    assert max(window) < EVERYSEC_LOSS_WINDOW, f"lost {len(vanished)}, the oldest {window}"
    ledger.scenario += f": {len(vanished)} acknowledged lost in the fsync window"
    archiver_url = fault_stack.chain.url("dlq-archiver")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # what the crash did not take is still owed, and paid
        tally = ledger.tally(
            smtp=fault_stack.smtp, http=fault_stack.http, archiver_url=archiver_url
        )
        if {user_id for user_id, _ in tally.lost_keys} <= vanished:
            break
        time.sleep(0.5)
    fault_stack.check(
        ledger,
        allow_refused=True,
        excused=vanished,
        duplicate_bound=PREFETCH,
        recovery_started=restarted_at,
        timeout=1,
    )


def assert_lost_whole(port: int, ledger: Ledger, vanished: set[str]) -> None:
    """A registration the AOF lost is lost whole: no user, and no email claim left behind."""
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)
    try:
        for user_id in ledger.accepted:
            claim = f"courier:user-email:{email_key(ledger.accepted[user_id].email)}"
            assert bool(client.exists(claim)) == (user_id not in vanished), (user_id, claim)
    finally:
        client.close()


def client_pause(port: int, milliseconds: int) -> None:
    """``CLIENT PAUSE <ms> ALL``: Redis holds every client's commands (its own included)."""
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)
    try:
        assert client.client_pause(milliseconds, all=True)  # ALL is the default mode
    finally:
        client.close()


@pytest.mark.matrix
@pytest.mark.parametrize(
    "stall",
    [
        pytest.param(4.0, id="shorter-than-the-timeout"),
        pytest.param(USER_SERVICE_REDIS_TIMEOUT + 5, id="longer-than-the-timeout"),
    ],
)
def test_redis_stall_answers_or_refuses_and_loses_nothing(
    fault_stack: FaultStack, stall: float
) -> None:
    ledger = fault_stack.ledger(f"F7 Redis stalled {stall:.0f} s (CLIENT PAUSE ALL) under load")

    with Registrations(ledger, fault_stack.chain.url("user-service"), threads=3) as load:
        load.wait_until(
            lambda answers: sum(a.status == 201 for a in answers) >= 30,
            what="30 registrations before the stall, their sends in flight",
        )
        paused_at = time.monotonic()
        client_pause(fault_stack.redis.port, int(stall * 1000))
        resumed_at = paused_at + stall
        time.sleep(stall)
        load.wait_until(
            lambda answers: sum(a.status == 201 and a.started > resumed_at for a in answers) >= 30,
            what="registrations accepted again after the stall",
        )

    answers = load.answers
    refused = assert_refusals_are_retryable_problems(answers)
    during = [a for a in answers if paused_at <= a.started < resumed_at]
    assert during, "registrations were made during the stall"
    if stall < USER_SERVICE_REDIS_TIMEOUT:
        # Within the client's timeout the stall is only a delay: they waited and succeeded.
        assert any(a.status == 201 and a.ended >= resumed_at for a in during), during[:5]
    else:
        # Past it, user-service gives up and says so instead of hanging.
        assert any(a.status == 503 for a in during), during[:5]
        assert refused
    fault_stack.check(
        ledger, allow_refused=True, duplicate_bound=PREFETCH, recovery_started=resumed_at
    )
