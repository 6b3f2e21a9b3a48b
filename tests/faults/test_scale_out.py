"""S1: one, two and four notification workers draining the same backlog through a 20 ms sender.

Each round builds a backlog of ``BACKLOG`` welcomes in ``notification.user-events`` with no
worker running (registrations go through user-service and its outbox, as always), then starts
*k* workers at once and times the drain from the moment all *k* are ready: drain seconds and
messages per second, measured from the SMTP sink's own receive times. The sink answers every
message 20 ms after its DATA (``delay_ms``), a slow relay; each worker holds ``PREFETCH``
messages, so one worker sends at most about PREFETCH / 20 ms and more workers should drain
faster until the machine (two shared cores here) is the limit.

Meanwhile, every second, the HPA's own formula is applied to what it reads: the External
metric is the work queue's ready + unacked messages, the target an AverageValue of
``autoscaling.messagesPerReplica`` (the chart's values.yaml), so the recommendation is
``ceil(backlog / messagesPerReplica)`` clamped to [minReplicas, maxReplicas] (before the
chart's scale-up/scale-down behaviour rate-limits it). The series, growing and draining, is
printed and written beside the fault report (``*-s1.json``). The management API refreshes
queue statistics every 5 s, so the series moves in steps, as the metric the HPA sees does.

The ledger then checks the whole run: every welcome sent once, none lost.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from courier_sinks.smtp import SmtpMessage, SmtpSink
from tests.support.faults import DEFAULT_REPORT, FaultStack, add_report_row
from tests.support.load import RegistrationLoad
from tests.support.processes import ServiceProcess, ServiceRunner

pytestmark = [pytest.mark.fault, pytest.mark.matrix]

REPO = Path(__file__).resolve().parents[2]
WORK_QUEUE = "notification.user-events"
BACKLOG = 600
SENDER_DELAY_MS = 20
PREFETCH = 4
WORKERS = (1, 2, 4)


@pytest.fixture
def smtp_sink(tmp_path: Path) -> Iterator[SmtpSink]:
    """The 20 ms sender: every message is answered 20 ms after its DATA."""
    with SmtpSink(store_path=tmp_path / "smtp.jsonl", delay_ms=SENDER_DELAY_MS) as sink:
        yield sink


@pytest.fixture
def fault_env() -> dict[str, dict[str, str]]:
    return {"notification-service": {"COURIER_AMQP_PREFETCH": str(PREFETCH)}}


def chart_autoscaling() -> dict[str, Any]:
    values = yaml.safe_load((REPO / "charts/courier/values.yaml").read_text())
    autoscaling: dict[str, Any] = values["autoscaling"]
    return autoscaling


def hpa_recommendation(backlog: int, autoscaling: dict[str, Any]) -> int:
    """autoscaling/v2, External metric, AverageValue target: ceil(metric / target), clamped."""
    wanted = math.ceil(backlog / float(autoscaling["messagesPerReplica"]))
    return max(int(autoscaling["minReplicas"]), min(int(autoscaling["maxReplicas"]), wanted))


@dataclass
class Sample:
    t: float
    phase: str
    ready: int
    unacked: int
    backlog: int
    replicas: int


class Sampler:
    """Reads the work queue's depth every second and applies the HPA formula to it."""

    def __init__(self, stack: FaultStack, autoscaling: dict[str, Any]) -> None:
        self.stack = stack
        self.autoscaling = autoscaling
        self.samples: list[Sample] = []
        self.phase = "idle"
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpa-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                import httpx

                response = httpx.get(
                    f"{self.stack.management}/api/queues/%2F/{WORK_QUEUE}",
                    auth=("guest", "guest"),
                    timeout=5,
                )
                body = response.json()
                ready = int(body.get("messages_ready") or 0)
                unacked = int(body.get("messages_unacknowledged") or 0)
                self.samples.append(
                    Sample(
                        t=round(time.monotonic() - self._start, 1),
                        phase=self.phase,
                        ready=ready,
                        unacked=unacked,
                        backlog=ready + unacked,
                        replicas=hpa_recommendation(ready + unacked, self.autoscaling),
                    )
                )
            except Exception as exc:  # a missed sample is a gap, not a failure
                print(f"S1 sampler: {exc!r}")
            self._stop.wait(1.0)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)


def received_at(message: SmtpMessage) -> float:
    return datetime.fromisoformat(str(message["received_at"])).timestamp()


def wait_backlog(stack: FaultStack, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    depth = -1
    while time.monotonic() < deadline:
        depth = stack.queue_depths().get(WORK_QUEUE, 0)
        if depth >= count and stack.outbox_backlog() == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"backlog {depth}, not {count}, after {timeout} s")


def start_workers(runner: ServiceRunner, template: ServiceProcess, k: int) -> list[ServiceProcess]:
    """*k* more notification workers like *template*, started at once (each its own port)."""
    env = {
        key: value
        for key, value in template.env.items()
        if key.startswith(("COURIER_", "OTEL_")) and key != "COURIER_HTTP_PORT"
    }
    with ThreadPoolExecutor(k) as pool:
        futures = [pool.submit(runner.start, "notification-service", env) for _ in range(k)]
        return [future.result() for future in futures]


def test_s1_scale_out_drains_the_same_backlog(
    fault_stack: FaultStack,
    services: ServiceRunner,
    smtp_sink: SmtpSink,
    request: pytest.FixtureRequest,
) -> None:
    autoscaling = chart_autoscaling()
    ledger = fault_stack.ledger("S1 scale-out: 1, 2 and 4 workers, 20 ms sender")
    template = fault_stack.chain.processes["notification-service"]
    assert template.stop() == 0  # no worker while the backlog builds
    rounds: list[dict[str, Any]] = []
    with Sampler(fault_stack, autoscaling) as sampler:
        for k in WORKERS:
            sampler.phase = f"backlog for {k}"
            load = RegistrationLoad(ledger, fault_stack.users, channels=("email",), count=BACKLOG)
            load.start().stop(timeout=300)
            wait_backlog(fault_stack, BACKLOG)
            time.sleep(6)  # a full statistics interval with the backlog standing
            before = len(smtp_sink.messages)
            sampler.phase = f"{k} worker(s) draining"
            started = time.monotonic()
            workers = start_workers(services, template, k)
            all_ready_wall = time.time()
            all_ready = time.monotonic()
            deadline = all_ready + 300
            while len(smtp_sink.messages) < before + BACKLOG:
                assert time.monotonic() < deadline, f"{k} workers did not drain in 300 s"
                time.sleep(0.05)
            drained = time.monotonic()
            window = [m for m in smtp_sink.messages[before:] if received_at(m) >= all_ready_wall]
            last = max(received_at(m) for m in smtp_sink.messages[before:])
            drain_seconds = max(last - all_ready_wall, 1e-3)
            rounds.append(
                {
                    "workers": k,
                    "backlog": BACKLOG,
                    "sent_before_all_ready": BACKLOG - len(window),
                    "start_seconds": round(all_ready - started, 1),
                    "drain_seconds": round(drain_seconds, 2),
                    "msg_per_s": round(len(window) / drain_seconds, 1),
                    "wall_seconds": round(drained - started, 1),
                }
            )
            sampler.phase = f"{k} worker(s) stopping"
            for worker in workers:
                assert worker.stop() == 0
            # The management API's statistics lag (seen: more than 6 s): wait until they show
            # the drained queue, 30 s at most, rather than for a fixed time.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                time.sleep(1)
                if sampler.samples and sampler.samples[-1].backlog == 0:
                    break
    for row in rounds:
        print(
            f"S1: {row['workers']} worker(s): {row['backlog']} welcomes, "
            f"{row['sent_before_all_ready']} sent while starting, the rest in "
            f"{row['drain_seconds']} s = {row['msg_per_s']} msg/s"
        )
        add_report_row(
            scenario=f"S1 {row['workers']} worker(s): {row['msg_per_s']} msg/s "
            f"({row['drain_seconds']} s for the backlog of {row['backlog']})",
            accepted=row["backlog"],
            sent=row["backlog"],
        )
    series = [asdict(s) for s in sampler.samples]
    print("S1 HPA recommendation, each second (t s, phase, ready+unacked, replicas):")
    for s in sampler.samples:
        print(f"  {s.t:6.1f} {s.phase:24} {s.backlog:5} -> {s.replicas}")
    target = Path(request.config.getoption("--fault-report") or DEFAULT_REPORT)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.with_name(target.stem + "-s1.json").write_text(
        json.dumps(
            {
                "sender_delay_ms": SENDER_DELAY_MS,
                "prefetch": PREFETCH,
                "autoscaling": {
                    key: autoscaling[key]
                    for key in ("minReplicas", "maxReplicas", "messagesPerReplica", "queue")
                },
                "rounds": rounds,
                "hpa_series": series,
            },
            indent=2,
        )
        + "\n"
    )
    # The formula saw the backlog: it asked for more replicas while it stood, min after.
    peak = max(s.replicas for s in sampler.samples)
    assert peak == hpa_recommendation(BACKLOG, autoscaling), series
    assert sampler.samples[-1].replicas == int(autoscaling["minReplicas"])
    fault_stack.chain.processes["notification-service"] = start_workers(services, template, 1)[0]
    fault_stack.check(ledger, duplicate_bound=0)
