"""Every dashboard panel, alert signal and autoscaling query returns data on a live system.

A private RabbitMQ (with ``rabbitmq_prometheus``), the three services as processes, the sinks
and a real Prometheus (Debian's package) scraping all of them every second, the way the chart's
ServiceMonitors label them (``namespace``, ``courier_service``). Registrations are driven
through user-service with failures mixed in (an SMS retried, pushes dead-lettered, one replay).
Then each query the operator's tools will run is asked of that Prometheus:

* every target of every panel in ``charts/courier/dashboards/*.json``;
* every alert of ``charts/courier/rules/courier-alerts.yaml``: each ``<signal> <cmp> <threshold>``
  part with the comparison taken off (a healthy system does not fire, but the series an alert
  watches must exist, so a misspelt metric or label cannot hide), and Prometheus must have
  loaded and evaluated the rules file without error;
* the prometheus-adapter rule behind the HPA's External metric (k8s/addons), and the
  management-API query KEDA's ``rabbitmq`` trigger makes in http mode.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import yaml

from courier_sinks.http import HttpSink
from courier_sinks.smtp import SmtpSink
from courier_testing.private_services import PrivateRabbitMQ
from notification_service.routes import USER_EVENTS_QUEUE
from tests.support.archiver import ADMIN
from tests.support.chain import SERVICES, Chain, start_chain
from tests.support.deploy import of_kind, render_objects
from tests.support.processes import ServiceRunner
from tests.support.prometheus import PrometheusServer

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "charts" / "courier" / "dashboards"
RULES = ROOT / "charts" / "courier" / "rules" / "courier-alerts.yaml"
ADAPTER = ROOT / "k8s" / "addons" / "prometheus-adapter-rules.yaml"
NAMESPACE = "courier"
VHOST = "/"
WORK_QUEUE = USER_EVENTS_QUEUE
RATE_INTERVAL = "1m"

pytestmark = pytest.mark.slow


# --- the queries ------------------------------------------------------------------------------


def panel_targets(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, expr) of every target, rows' nested panels included."""
    for panel in dashboard.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                if target.get("expr"):
                    yield inner.get("title", "?"), target["expr"]


def constants(dashboard: dict[str, Any]) -> dict[str, str]:
    """Values of the dashboard's constant variables (``messages_per_replica``)."""
    found: dict[str, str] = {}
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "constant":
            found[variable["name"]] = str(variable.get("query", ""))
    return found


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's variable interpolation for the forms the dashboards use."""
    for name, value in values.items():
        expr = expr.replace("${" + name + "}", value)
        expr = re.sub(rf"\${re.escape(name)}\b", value, expr)
    assert "$" not in expr, f"a variable is left in {expr!r}"
    return expr


_SET_OP = re.compile(r"\s+(and|or|unless)\s+(?:(?:on|ignoring)\s*\([^)]*\)\s*)?")
_COMPARISON = re.compile(r"\s*(==|!=|>=|<=|>|<)\s*(bool\s+)?-?[0-9.]+(e[+-]?[0-9]+)?\s*$")


def _top_level_split(expr: str) -> list[str]:
    """Split *expr* at ``and``/``or``/``unless`` outside parentheses and brackets."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(expr):
        char = expr[i]
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0:
            match = _SET_OP.match(expr, i)
            if match and (i == 0 or expr[i].isspace()):
                parts.append(expr[start:i])
                start = i = match.end()
                continue
        i += 1
    parts.append(expr[start:])
    return [p.strip() for p in parts if p.strip()]


def alert_signals(expr: str) -> list[str]:
    """The signal of each ``<signal> <cmp> <threshold>`` part of an alert expression.

    ``absent(x)`` watches ``x``; a part with no trailing comparison is its own signal.
    """
    signals = []
    for part in _top_level_split(" ".join(expr.split())):
        signal = _COMPARISON.sub("", part).strip()
        while signal.startswith("(") and signal.endswith(")") and _balanced(signal[1:-1]):
            signal = signal[1:-1].strip()
        absent = re.fullmatch(r"absent(?:_over_time)?\((.*)\)", signal)
        if absent:
            signal = re.sub(r"\[[^\]]+\]$", "", absent.group(1).strip())
        signals.append(signal)
    return signals


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += char == "("
        depth -= char == ")"
        if depth < 0:
            return False
    return depth == 0


def test_alert_signals_are_split_as_intended() -> None:
    assert alert_signals('up{courier_service!=""} == 0') == ['up{courier_service!=""}']
    assert alert_signals(
        'sum by (namespace, queue) (courier_queue_messages{queue!~".*retry.*"}) > 1000\n'
        "and on (namespace, queue) sum by (namespace, queue) (deriv(x[10m])) > 0"
    ) == [
        'sum by (namespace, queue) (courier_queue_messages{queue!~".*retry.*"})',
        "sum by (namespace, queue) (deriv(x[10m]))",
    ]
    assert alert_signals('absent(up{courier_service="user-service"})') == [
        'up{courier_service="user-service"}'
    ]
    assert alert_signals("(a / b) > 0.1 unless c < bool 2") == ["a / b", "c"]


# --- the live system --------------------------------------------------------------------------


def scrape_config(chain: Chain, broker: PrivateRabbitMQ) -> dict[str, Any]:
    jobs: list[dict[str, Any]] = [
        {
            "job_name": service,
            "metrics_path": "/metrics",
            "static_configs": [
                {
                    "targets": [chain.url(service).removeprefix("http://")],
                    # What the chart's ServiceMonitor and Prometheus' k8s discovery add.
                    "labels": {"namespace": NAMESPACE, "courier_service": service},
                }
            ],
        }
        for service in SERVICES
    ]
    jobs.append(
        {
            # As k8s/addons/rabbitmq-cluster.yaml's ServiceMonitor scrapes the broker.
            "job_name": "rabbitmq",
            "metrics_path": "/metrics/detailed",
            "params": {"family": ["queue_coarse_metrics", "queue_consumer_count"]},
            "static_configs": [{"targets": [f"127.0.0.1:{broker.prometheus_port}"]}],
        }
    )
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": jobs,
    }


def drive(chain: Chain, smtp_sink: SmtpSink, http_sink: HttpSink) -> None:
    """Welcomes on every channel; an SMS retried; pushes dead-lettered; one replayed; one
    user deleted (the archiver's erasure consumer)."""
    http_sink.fail_next(2, 503, path="/sms")
    http_sink.fail_next(3, 410, path="/push", message="token unregistered")
    users = [
        chain.register(
            f"user{n}@example.com",
            channels=["email", "sms", "push"],
            phone=f"+1415555{n:04d}",
            push_token=f"device-{n}",
        )
        for n in range(12)
    ]
    archiver = httpx.Client(base_url=chain.url("dlq-archiver"), headers=ADMIN, timeout=10)
    deadline = time.monotonic() + 90
    items: list[dict[str, Any]] = []
    while time.monotonic() < deadline and len(items) < 3:
        items = archiver.get("/v1/dead-letters").json()["items"]
        time.sleep(0.3)
    assert len(items) >= 3, "the permanent push failures were archived"
    replayed = archiver.post(f"/v1/dead-letters/{items[0]['id']}/replay")
    assert replayed.status_code == 202, replayed.text
    while time.monotonic() < deadline and len(smtp_sink.messages) < 12:
        time.sleep(0.3)
    assert len(smtp_sink.messages) >= 12, "every welcome email was sent"
    deleted = httpx.delete(f"{chain.url('user-service')}/v1/users/{users[-1]['id']}", timeout=10)
    assert deleted.status_code == 204, deleted.text


def wait_for_series(prometheus: PrometheusServer, exprs: list[str], timeout: float = 60) -> None:
    """Until each of *exprs* has data (rates need two scrapes of a counter that moved)."""
    deadline = time.monotonic() + timeout
    missing = exprs
    while time.monotonic() < deadline:
        missing = [e for e in exprs if not prometheus.query(e)]
        if not missing:
            return
        time.sleep(1)
    pytest.fail(f"no data within {timeout}s for {missing}; targets {prometheus.targets_up()}")


def test_every_dashboard_alert_and_autoscaling_query_returns_data(
    tmp_path: Path,
    fault_broker: PrivateRabbitMQ,
    services: ServiceRunner,
    redis_url: str,
    redis_prefix: str,
    smtp_sink: SmtpSink,
    http_sink: HttpSink,
) -> None:
    broker = fault_broker  # a private node with the management and prometheus plugins
    management = f"http://guest:guest@127.0.0.1:{broker.management_port}"
    chain = start_chain(
        services,
        amqp_url=broker.url,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        smtp_sink=smtp_sink,
        http_sink=http_sink,
        management_url=management,
    )
    prometheus = PrometheusServer(tmp_path / "prometheus", scrape_config(chain, broker))
    try:
        prometheus.start()
        wait_for_series(prometheus, ['up{job="rabbitmq"} == 1', "count(up == 1) == 4"])
        drive(chain, smtp_sink, http_sink)
        # Settled: two scrapes of every counter the rate panels read.
        wait_for_series(
            prometheus,
            [
                f"rate(courier_replays_total[{RATE_INTERVAL}])",
                f"rate(courier_notifications_total[{RATE_INTERVAL}])",
                f"rate(courier_dead_letters_archived_total[{RATE_INTERVAL}])",
                f"rate(courier_outbox_relayed_total[{RATE_INTERVAL}])",
                # the erasure consumer took the user.deleted
                'rate(courier_messages_consumed_total{courier_service="dlq-archiver"}[1m])',
                "courier_queue_messages",
                "courier_dead_letter_group_size",
            ],
        )
        check_everything(prometheus, broker)
    finally:
        prometheus.close()


def check_everything(prometheus: PrometheusServer, broker: PrivateRabbitMQ) -> None:
    empty: list[str] = []
    checked = 0

    # Dashboards.
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files, "the chart ships dashboards"
    for path in files:
        dashboard = json.loads(path.read_text())
        values = {
            "namespace": NAMESPACE,
            "vhost": VHOST,
            "__rate_interval": RATE_INTERVAL,
            **constants(dashboard),
        }
        for title, expr in panel_targets(dashboard):
            checked += 1
            if not prometheus.query(substitute(expr, values)):
                empty.append(f"{path.name} · {title}: {expr}")

    # Alerts: loaded, evaluated without error, and each signal has data.
    groups = prometheus.api("rules")["groups"]
    loaded = [rule for group in groups for rule in group["rules"] if rule["type"] == "alerting"]
    rules_file = yaml.safe_load(RULES.read_text())
    declared = [r for g in rules_file["groups"] for r in g["rules"] if "alert" in r]
    assert {r["name"] for r in loaded} == {r["alert"] for r in declared}
    unhealthy = [(r["name"], r.get("lastError")) for r in loaded if r["health"] != "ok"]
    assert not unhealthy, f"alert rules failing to evaluate: {unhealthy}"
    for rule in declared:
        for signal in alert_signals(rule["expr"]):
            checked += 1
            if not prometheus.query(signal):
                empty.append(f"alert {rule['alert']}: {signal}")

    # prometheus-adapter: the series the rule discovers, and its metrics query as the HPA's
    # selector (queue=<work queue>) asks for it.
    adapter = yaml.safe_load(ADAPTER.read_text())
    for rule in adapter["rules"]["external"]:
        series = prometheus.api("series", **{"match[]": rule["seriesQuery"]})
        checked += 1
        if not series:
            empty.append(f"adapter seriesQuery: {rule['seriesQuery']}")
        name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"])
        assert name is not None
        query = (
            rule["metricsQuery"]
            .replace("<<.Series>>", name.group(0))
            .replace("<<.LabelMatchers>>", f'queue="{WORK_QUEUE}"')
            .replace("<<.GroupBy>>", "queue")
        )
        checked += 1
        if not prometheus.query(query):
            empty.append(f"adapter metricsQuery: {query}")

    # KEDA's rabbitmq trigger in http mode: GET /api/queues/<vhost>/<queue>, reads `messages`.
    (scaled,) = of_kind(render_objects("keda"), "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["metadata"]["protocol"] == "http"
    queue = trigger["metadata"]["queueName"]
    response = httpx.get(
        f"{broker.management_url}/api/queues/{quote(VHOST, safe='')}/{quote(queue)}",
        auth=("guest", "guest"),
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert isinstance(response.json().get("messages"), int), response.json()

    assert checked > 40, f"only {checked} queries found: are the dashboards and rules there?"
    assert not empty, "queries with no data:\n" + "\n".join(empty)
