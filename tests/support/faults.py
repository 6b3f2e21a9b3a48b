"""The fault suite's plumbing: the whole stack on private servers, and the report.

* ``fault_stack``: a private RabbitMQ (management + prometheus plugins) and a private Redis
  (AOF on), the SMTP and HTTP sinks, and the three services as processes wired to them. Faults
  are done to these; the shared servers are never touched.
* ``@pytest.mark.matrix``: part of the full matrix, which only ``make faults`` runs
  (``--fault-matrix``, the switch is `courier_testing.matrix`); ``make test`` runs the rest of
  ``tests/faults`` (the fast subset).
* ``FaultStack.check``: settles the ledger (tests/support/ledger.py), asserts lost = 0,
  unexpected = 0, duplicates within the bound and every queue and the outbox empty, and adds
  the scenario's row to the report that the session prints and writes (``--fault-report``,
  default ``var/faults/report.md`` and ``.json``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from courier_sinks.http import HttpSink
from courier_sinks.smtp import SmtpSink
from courier_testing.private_services import PrivateRabbitMQ, PrivateRedis
from courier_testing.rabbitmq4 import start_rabbitmq4_node
from tests.support.chain import Chain, start_chain
from tests.support.ledger import Ledger, Tally
from tests.support.processes import ServiceRunner

REPO = Path(__file__).resolve().parents[2]
DEFAULT_REPORT = REPO / "var" / "faults" / "report.md"
COLUMNS = (
    ("scenario", "scenario"),
    ("accepted", "accepted"),
    ("sent", "sent"),
    ("dead_lettered", "dead-lettered"),
    ("lost", "lost"),
    ("unexpected", "unexpected"),
    ("refused", "refused"),
    ("duplicates", "duplicates"),
    ("duplicate_bound", "dup. bound"),
    ("provider_replays", "provider replays"),
    ("in_doubt_sent", "in doubt, sent"),
    ("recovery_seconds", "recovery (s)"),
)

_rows: list[dict[str, Any]] = []


# --- pytest hooks -----------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("courier faults").addoption(
        "--fault-report",
        default=None,
        help=f"where the fault report goes (Markdown; JSON beside it); default {DEFAULT_REPORT}",
    )


def render_table(rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:.1f}"
        return str(value)

    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(cell(row.get(key)) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _scenario_order(row: dict[str, Any]) -> tuple[str, int, str]:
    """B1 < B2 < F1 < F2 < F10: the issue's numbering, not the string order."""
    name = str(row["scenario"])
    match = re.match(r"([A-Z])(\d+)", name)
    return (match[1], int(match[2]), name) if match else ("~", 0, name)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if not _rows:
        return
    rows = sorted(_rows, key=_scenario_order)
    table = render_table(rows)
    target = Path(config.getoption("--fault-report") or DEFAULT_REPORT)
    target.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    matrix = "full matrix" if config.getoption("--fault-matrix") else "fast subset"
    target.write_text(
        "# Courier fault report\n\n"
        f"{stamp}, {matrix}. lost = accepted − (sent ∪ dead-lettered); unexpected = sent − "
        "accepted; duplicates = effects delivered more than once (bound: what was in flight "
        "at the crash); provider replays = re-sends an HTTP provider recognised by "
        "Idempotency-Key; in doubt, sent = registrations answered 503 or cut off (the client "
        "cannot know whether the store applied them) whose welcome went out because it had; "
        "recovery = seconds from the fault's end until every owed "
        "notification was sent or dead-lettered.\n\n" + table
    )
    target.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    terminalreporter.write_sep("=", "fault report")
    terminalreporter.write(table)
    terminalreporter.write_line(f"written to {target} (and .json)")


def add_report_row(**row: Any) -> None:
    """Add a row to this session's fault report (keys: see COLUMNS; missing ones show —).

    `FaultStack.check` adds the ledger scenarios' rows; tests without a ledger (bad input on
    the wire, say) report what they checked through this.
    """
    assert "scenario" in row, "a report row needs a scenario"
    _rows.append(row)


# --- the stack --------------------------------------------------------------------------------


@dataclass
class FaultStack:
    broker: PrivateRabbitMQ
    redis: PrivateRedis
    chain: Chain
    smtp: SmtpSink
    http: HttpSink
    users: httpx.Client
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def management(self) -> str:
        assert self.broker.management_url is not None
        return self.broker.management_url

    def ledger(self, scenario: str) -> Ledger:
        """A ledger for *scenario*; on RabbitMQ 4 its row is named ``V4 <scenario> (4.0.x)``."""
        if self.broker.root is not None:
            version = self.broker.root.version.split("-")[0]
            scenario = f"V4 {scenario} (RabbitMQ {version})"
        return Ledger(scenario)

    def queue_depths(self) -> dict[str, int]:
        """Ready + unacked of every queue in the vhost, from the private broker's API."""
        response = httpx.get(
            f"{self.management}/api/queues/{quote('/', safe='')}",
            auth=("guest", "guest"),
            timeout=10,
        )
        response.raise_for_status()
        return {q["name"]: int(q.get("messages", 0)) for q in response.json()}

    def outbox_backlog(self) -> float:
        text = self.chain.metrics_text("user-service")
        for line in text.splitlines():
            if line.startswith("courier_outbox_backlog "):
                return float(line.split()[1])
        raise AssertionError("user-service exposes no courier_outbox_backlog")

    def wait_drained(self, timeout: float = 60) -> None:
        """Until every queue and the outbox are empty (management stats lag ~5 s)."""
        deadline = time.monotonic() + timeout
        depths: dict[str, int] = {}
        backlog = -1.0
        while time.monotonic() < deadline:
            depths = {q: n for q, n in self.queue_depths().items() if n}
            backlog = self.outbox_backlog()
            if not depths and backlog == 0:
                return
            time.sleep(1)
        raise AssertionError(f"not drained: queues {depths}, outbox backlog {backlog}")

    def check(
        self,
        ledger: Ledger,
        *,
        duplicate_bound: int = 0,
        recovery_started: float | None = None,
        timeout: float = 120,
        allow_refused: bool = False,
        excused: Collection[str] = (),
    ) -> Tally:
        """Settle the ledger, assert the guarantees, and add the row to the report.

        *recovery_started* is the ``time.monotonic()`` at which the fault ended; recovery is
        measured from there until nothing owed was missing. *allow_refused* is for faults of
        user-service's own store (Redis down or stalled): a registration may then be refused,
        but only with a 503 problem the client can retry, and a refused one is not in A.
        *excused* are user ids whose loss the store's own durability setting explains (the AOF
        tail a crash took under ``appendfsync everysec``): their lost notifications still count
        in the row, but do not fail the check.
        """
        tally = ledger.settle(
            smtp=self.smtp,
            http=self.http,
            archiver_url=self.chain.url("dlq-archiver"),
            timeout=timeout,
        )
        if recovery_started is not None:
            tally.recovery_seconds = round(time.monotonic() - recovery_started, 1)
        if not [key for key in tally.lost_keys if key[0] not in excused]:
            # Nothing is missing: let the queues drain, then count again, so a late
            # duplicate (a redelivery still in flight) is in the row and in the check.
            self.wait_drained()
            final = ledger.tally(
                smtp=self.smtp, http=self.http, archiver_url=self.chain.url("dlq-archiver")
            )
            final.recovery_seconds = tally.recovery_seconds
            tally = final
        row = {**tally.row(), "duplicate_bound": duplicate_bound}
        if allow_refused:
            row["refused"] = len(ledger.refused)
        _rows.append(row)
        self.rows.append(row)
        assert tally.accepted > 0, "the scenario accepted nothing: it proves nothing"
        if allow_refused:
            not_503 = [r for r in ledger.refused if r[0] != 503 or '"status":503' not in r[1]]
            assert not not_503, f"refused other than with a 503 problem: {not_503[:5]}"
        else:
            assert not ledger.refused, f"registrations refused: {ledger.refused[:5]}"
        unexcused = [key for key in tally.lost_keys if key[0] not in excused]
        assert not unexcused, f"lost {len(unexcused)}: {unexcused[:10]}"
        assert tally.unexpected == 0, f"unexpected {tally.unexpected}: {tally.unexpected_keys[:10]}"
        assert tally.duplicates <= duplicate_bound, (
            f"{tally.duplicates} duplicates, more than the {duplicate_bound} in flight"
        )
        self.wait_drained()
        return tally


#: Parametrize ``fault_broker`` (indirect) with these to run a scenario on both releases:
#: the host's 3.10 and, in the full matrix, Debian 13's 4.0 in a chroot (``V4`` in the id).
RABBITMQ_RELEASES = (
    pytest.param("3.10", id="rabbitmq3.10"),
    pytest.param("4.0", id="V4-rabbitmq4.0", marks=pytest.mark.matrix),
)


@pytest.fixture
def fault_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PrivateRabbitMQ]:
    """A private node with management: RabbitMQ 3.10, or 4.0 when parametrized with "4.0"."""
    release = getattr(request, "param", "3.10")
    if release == "4.0":
        root = request.getfixturevalue("rabbitmq4_root")
        node, epmd = start_rabbitmq4_node(root, tmp_path / "rabbitmq4")
        try:
            yield node
        finally:
            node.close()
            epmd.close()
        return
    if release != "3.10":
        raise ValueError(f"fault_broker: no RabbitMQ release {release!r} (3.10 or 4.0)")
    node = PrivateRabbitMQ(tmp_path / "rabbitmq", management=True)
    try:
        node.start()
        yield node
    finally:
        node.close()


@pytest.fixture
def fault_env() -> dict[str, dict[str, str]]:
    """Extra environment per service for `fault_stack`; override it in a test module."""
    return {}


@pytest.fixture
def fault_amqp_url(fault_broker: PrivateRabbitMQ) -> str:
    """The AMQP URL the services get; override it to put something in between (a proxy)."""
    return fault_broker.url


@pytest.fixture
def fault_stack(
    fault_env: dict[str, dict[str, str]],
    fault_amqp_url: str,
    fault_broker: PrivateRabbitMQ,
    private_redis: PrivateRedis,
    services: ServiceRunner,
    smtp_sink: SmtpSink,
    http_sink: HttpSink,
) -> Iterator[FaultStack]:
    chain = start_chain(
        services,
        amqp_url=fault_amqp_url,
        redis_url=private_redis.url,
        redis_prefix="courier:",
        smtp_sink=smtp_sink,
        http_sink=http_sink,
        management_url=f"http://guest:guest@127.0.0.1:{fault_broker.management_port}",
        extra_env={"COURIER_AMQP_HEARTBEAT_SECONDS": "5"},
        service_env=fault_env,
    )
    with httpx.Client(base_url=chain.url("user-service"), timeout=30) as users:
        yield FaultStack(
            broker=fault_broker,
            redis=private_redis,
            chain=chain,
            smtp=smtp_sink,
            http=http_sink,
            users=users,
        )
