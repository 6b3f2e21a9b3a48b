"""Grafana dashboards (charts/courier/dashboards): generated, consistent, shipped by the chart.

The JSON files are scripts/dashboards.py's output (`make dashboards`); a drift check fails when
one side is edited without the other. Every query may read only the families catalogued in
docs/metrics.md, with their labels, and only the template variables its dashboard defines;
Courier series are selected by namespace (and service), RabbitMQ's by vhost. The chart renders
one ConfigMap per dashboard for Grafana's sidecar.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.deploy import of_kind, render_objects
from tests.support.prometheus import require_binary

# Loaded this way so the module type-checks with or without types-PyYAML installed.
yaml: Any = importlib.import_module("yaml")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "dashboards.py"
DASHBOARD_DIR = ROOT / "charts" / "courier" / "dashboards"
CATALOG = ROOT / "docs" / "metrics.md"
VALUES = ROOT / "charts" / "courier" / "values.yaml"

#: uid → the courier_service its selectors must name (None: the overview spans all three).
DASHBOARDS: dict[str, str | None] = {
    "courier-overview": None,
    "courier-user-service": "user-service",
    "courier-notification-service": "notification-service",
    "courier-dlq-archiver": "dlq-archiver",
}
SERVICES = frozenset(s for s in DASHBOARDS.values() if s)
#: Labels Prometheus adds to every scraped series (docs/metrics.md, above the tables).
TARGET_LABELS = frozenset({"namespace", "job", "instance", "pod", "courier_service"})
#: Series Prometheus writes itself for every scrape target, not exposed by any service.
SYNTHETIC = frozenset({"up"})
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
#: The template variables a dashboard may define, and Grafana built-ins a query may use.
VARIABLES = frozenset({"datasource", "namespace", "vhost", "messages_per_replica"})
BUILTINS = frozenset({"__rate_interval"})
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRID_COLUMNS = 24

_STR = r'"(?:[^"\\]|\\.)*"'
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{((?:[^{}\"]|" + _STR + r")*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*(" + _STR + ")")
RANGE = re.compile(r"\[[^\]]*\]")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
IDENTIFIER = re.compile(r"(?<![\w$:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()")
KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan", "group_left", "group_right"}
)
VARIABLE = re.compile(r"\$(?:\{(\w+)(?::[^}]*)?\}|(\w+))")
#: What the variables stand for when a query is checked outside Grafana.
SAMPLE_VALUES = {
    "namespace": "courier",
    "vhost": "/",
    "messages_per_replica": "100",
    "__rate_interval": "1m",
}


# --- docs/metrics.md ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Family:
    kind: str
    labels: frozenset[str]


@functools.cache
def catalog() -> dict[str, Family]:
    """Every family in docs/metrics.md's tables: backticked name → type and labels."""
    families: dict[str, Family] = {}
    for line in CATALOG.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        name = re.fullmatch(r"`([a-zA-Z_:][a-zA-Z0-9_:]*)`", cells[0])
        if name and len(cells) >= 3:
            labels = frozenset(re.findall(r"`([a-zA-Z_][a-zA-Z0-9_]*)`", cells[2]))
            families[name.group(1)] = Family(cells[1], labels)
    assert families, f"no metric table found in {CATALOG}"
    return families


def family_of(metric: str) -> tuple[str, Family] | None:
    """The catalogued family a series name belongs to (histogram suffixes map to it)."""
    families = catalog()
    if metric in families:
        return metric, families[metric]
    for suffix in HISTOGRAM_SUFFIXES:
        base = metric.removesuffix(suffix)
        if base != metric and families.get(base, Family("", frozenset())).kind == "histogram":
            return base, families[base]
    return None


def labels_of(metric: str) -> frozenset[str]:
    """The labels a series of `metric` may carry once scraped."""
    if metric in SYNTHETIC:
        return TARGET_LABELS
    found = family_of(metric)
    assert found, metric
    extra = {"le"} if metric.endswith("_bucket") else set()
    return found[1].labels | TARGET_LABELS | extra


def test_catalog_parses() -> None:
    families = catalog()
    assert families["courier_http_requests_total"] == Family(
        "counter", frozenset({"method", "route", "status"})
    )
    assert families["courier_outbox_backlog"].labels == frozenset()
    assert families["rabbitmq_detailed_queue_messages"].labels == {"vhost", "queue"}


# --- PromQL, just enough of it --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Selector:
    metric: str | None
    matchers: tuple[tuple[str, str, str], ...]  # (label, operator, value without quotes)

    def value(self, label: str) -> tuple[str, str] | None:
        for name, op, value in self.matchers:
            if name == label:
                return op, value
        return None


@dataclass(frozen=True, slots=True)
class Parsed:
    selectors: tuple[Selector, ...]
    metrics: frozenset[str]
    grouping_labels: frozenset[str]


def parse(expr: str) -> Parsed:
    """Selectors, series names and grouping labels of a PromQL expression."""
    selectors = tuple(
        Selector(
            m.group(1),
            tuple(
                (label, op, json.loads(value)) for label, op, value in MATCHER.findall(m.group(2))
            ),
        )
        for m in SELECTOR.finditer(expr)
    )
    bare = SELECTOR.sub(lambda m: f"{m.group(1) or ''} ", expr)
    bare = RANGE.sub(" ", bare)
    grouping = frozenset(
        label.strip()
        for group in GROUPING.findall(bare)
        for label in group.split(",")
        if label.strip()
    )
    bare = GROUPING.sub(" ", bare)
    metrics = frozenset(m for m in IDENTIFIER.findall(bare) if m.lower() not in KEYWORDS)
    return Parsed(selectors, metrics, grouping)


def test_parse_reads_selectors_metrics_and_grouping() -> None:
    parsed = parse(
        'histogram_quantile(0.99, sum by (le, queue) (rate(x_bucket{a="}", b=~"$v"}[5m])))'
        " / on (queue) group_left max(y) or vector(0) * $messages_per_replica"
    )
    assert parsed.metrics == {"x_bucket", "y"}
    assert parsed.grouping_labels == {"le", "queue"}
    assert parsed.selectors == (Selector("x_bucket", (("a", "=", "}"), ("b", "=~", "$v"))),)


# --- The committed dashboards ---------------------------------------------------------------


def load(uid: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DASHBOARD_DIR / f"{uid}.json").read_text())
    return loaded


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and panels nested in collapsed rows included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def data_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    return (p for p in all_panels(dashboard) if p["type"] != "row")


def exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, expr) of every target."""
    for panel in data_panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target.get("expr", "")


def test_the_generator_matches_the_committed_json() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, (
        f"charts/courier/dashboards drifted from scripts/dashboards.py; run `make dashboards`.\n"
        f"{result.stdout}{result.stderr}"
    )


def test_check_mode_lists_drifted_missing_and_extra_files(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(SCRIPT), "--out", str(tmp_path), *args],
            capture_output=True,
            text=True,
            check=False,
        )

    assert run().returncode == 0
    assert run("--check").returncode == 0
    (tmp_path / "courier-overview.json").write_text("{}\n")
    (tmp_path / "courier-dlq-archiver.json").unlink()
    (tmp_path / "hand-made.json").write_text("{}\n")
    result = run("--check")
    assert result.returncode == 1
    assert "drifted: courier-overview.json" in result.stdout
    assert "missing: courier-dlq-archiver.json" in result.stdout
    assert "extra: hand-made.json" in result.stdout


def test_exactly_the_four_dashboards_are_committed() -> None:
    assert {p.stem for p in DASHBOARD_DIR.glob("*.json")} == set(DASHBOARDS)
    titles = [load(uid)["title"] for uid in DASHBOARDS]
    assert len(set(titles)) == len(titles)


@pytest.mark.parametrize("uid", DASHBOARDS)
def test_dashboard_metadata(uid: str) -> None:
    dashboard = load(uid)
    assert dashboard["uid"] == uid
    assert "courier" in dashboard["tags"]
    assert dashboard.get("description")
    assert any(p["type"] == "row" for p in dashboard["panels"]), "panels are grouped in rows"


@pytest.mark.parametrize("uid", DASHBOARDS)
def test_panel_ids_are_unique_and_the_grid_has_no_overlap(uid: str) -> None:
    dashboard = load(uid)
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {uid}: {sorted(ids)}"
    cells: dict[tuple[int, int], str] = {}
    for panel in all_panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] >= 0, panel
        assert 0 < pos["w"] <= GRID_COLUMNS - pos["x"], panel
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


@pytest.mark.parametrize("uid", DASHBOARDS)
def test_every_panel_queries_prometheus_through_the_datasource_variable(uid: str) -> None:
    for panel in data_panels(load(uid)):
        title = panel["title"]
        assert panel.get("description"), f"{title!r} has no description"
        assert panel.get("fieldConfig", {}).get("defaults", {}).get("unit"), f"{title!r}: unit"
        assert panel.get("datasource") == DATASOURCE, title
        targets = panel.get("targets") or []
        assert targets, f"{title!r} has no target"
        ref_ids = [t.get("refId") for t in targets]
        assert len(set(ref_ids)) == len(ref_ids), f"{title!r}: duplicate refIds {ref_ids}"
        for target in targets:
            assert target.get("datasource") == DATASOURCE, title
            assert target.get("expr", "").strip(), f"{title!r} has an empty expr"


@pytest.mark.parametrize("uid", DASHBOARDS)
def test_template_variables_are_the_allowed_ones_and_defined(uid: str) -> None:
    dashboard = load(uid)
    defined = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(defined) <= VARIABLES
    assert defined["datasource"]["type"] == "datasource"
    assert defined["datasource"]["query"] == "prometheus"
    assert defined["namespace"]["type"] == "query"
    assert defined["namespace"]["query"] == "label_values(courier_http_requests_total, namespace)"
    if "vhost" in defined:
        assert defined["vhost"]["type"] == "query"
        assert defined["vhost"]["query"] == "label_values(rabbitmq_detailed_queue_messages, vhost)"
    if "messages_per_replica" in defined:
        constant = defined["messages_per_replica"]
        chart_value = yaml.safe_load(VALUES.read_text())["autoscaling"]["messagesPerReplica"]
        assert constant["type"] == "constant"
        assert constant["query"] == str(chart_value), "keep it equal to the chart's value"
    for variable in defined.values():
        if variable.get("datasource") is not None:
            assert variable["datasource"] == DATASOURCE
    used: set[str] = set()
    for title, expr in exprs(dashboard):
        names = {a or b for a, b in VARIABLE.findall(expr)}
        undefined = names - set(defined) - BUILTINS
        assert not undefined, f"{title!r} uses undefined variables {undefined}: {expr}"
        used |= names
    assert set(defined) - {"datasource"} <= used, "every variable defined is used"


@pytest.mark.parametrize("uid", DASHBOARDS)
def test_queries_use_only_catalogued_metrics_and_labels(uid: str) -> None:
    for title, expr in exprs(load(uid)):
        parsed = parse(expr)
        assert parsed.metrics, f"{title!r} reads no metric: {expr}"
        unknown = {m for m in parsed.metrics if m not in SYNTHETIC and family_of(m) is None}
        assert not unknown, f"{title!r} reads {unknown}, not in docs/metrics.md: {expr}"
        allowed: set[str] = set()
        for metric in parsed.metrics:
            allowed |= labels_of(metric)
        for selector in parsed.selectors:
            assert selector.metric, f"{title!r}: a selector without a metric name: {expr}"
            unknown = {label for label, _, _ in selector.matchers} - labels_of(selector.metric)
            assert not unknown, f"{title!r}: {selector.metric} has no label {unknown}: {expr}"
        unknown = set(parsed.grouping_labels - allowed)
        assert not unknown, f"{title!r} groups by labels no series has: {unknown}: {expr}"


@pytest.mark.parametrize("uid", DASHBOARDS)
def test_selectors_follow_the_label_conventions(uid: str) -> None:
    own_service = DASHBOARDS[uid]
    for title, expr in exprs(load(uid)):
        for selector in parse(expr).selectors:
            assert selector.metric
            if selector.metric.startswith("rabbitmq_"):
                # The broker's series carry the broker's namespace: select by vhost.
                assert selector.value("vhost") == ("=~", "$vhost"), f"{title!r}: {expr}"
                assert selector.value("namespace") is None, f"{title!r}: {expr}"
                continue
            assert selector.value("namespace") == ("=~", "$namespace"), f"{title!r}: {expr}"
            chosen = selector.value("courier_service")
            if chosen is not None:
                assert chosen[0] == "=", f"{title!r}: {expr}"
                assert chosen[1] in SERVICES, f"{title!r}: {expr}"
            if own_service is not None:
                assert chosen == ("=", own_service), f"{title!r} leaves {own_service}: {expr}"


def test_the_overview_covers_the_whole_chain() -> None:
    overview = load("courier-overview")
    families: set[str] = set()
    for _, expr in exprs(overview):
        for metric in parse(expr).metrics:
            found = family_of(metric)
            families.add(found[0] if found else metric)
    assert families >= {
        "courier_http_requests_total",  # registrations/s
        "courier_messages_published_total",
        "courier_messages_consumed_total",
        "courier_queue_messages",  # backlog per queue
        "courier_event_age_seconds",
        "courier_notification_event_age_seconds",
        "courier_notifications_total",  # failure rate by channel
        "courier_outbox_backlog",
        "courier_outbox_oldest_age_seconds",
        "courier_dead_letters_archived_total",
        "courier_dead_letters_oldest_age_seconds",
        "up",  # replicas
        "rabbitmq_detailed_queue_messages",  # the HPA's metric
    }
    all_exprs = {expr for _, expr in exprs(overview)}
    assert (
        'sum(rate(courier_http_requests_total{courier_service="user-service", '
        'namespace=~"$namespace", method="POST", route="/v1/users", status="201"}'
        "[$__rate_interval]))"
    ) in all_exprs
    assert (
        'ceil(sum(rabbitmq_detailed_queue_messages{vhost=~"$vhost", '
        'queue="notification.user-events"}) / $messages_per_replica)'
    ) in all_exprs


@pytest.mark.parametrize("uid", [uid for uid, service in DASHBOARDS.items() if service])
def test_service_dashboards_show_duration_and_saturation(uid: str) -> None:
    families: set[str] = set()
    for _, expr in exprs(load(uid)):
        for metric in parse(expr).metrics:
            found = family_of(metric)
            families.add(found[0] if found else metric)
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= families
    assert families & {
        "courier_http_request_duration_seconds",
        "courier_handler_duration_seconds",
        "courier_notification_send_duration_seconds",
    }


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    rules: list[dict[str, Any]] = []
    for uid in DASHBOARDS:
        for title, expr in exprs(load(uid)):
            concrete = VARIABLE.sub(
                lambda m: SAMPLE_VALUES.get(m.group(1) or m.group(2), m.group(0)), expr
            )
            labels = {"dashboard": uid, "panel": title}
            rules.append(
                {"record": f"courier:check{len(rules)}", "expr": concrete, "labels": labels}
            )
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"promtool check rules:\n{result.stdout}{result.stderr}"


# --- The chart ships them -------------------------------------------------------------------


def test_the_chart_renders_a_configmap_per_dashboard() -> None:
    shipped: dict[str, Any] = {}
    for config_map in of_kind(render_objects("default"), "ConfigMap"):
        if config_map["metadata"].get("labels", {}).get("grafana_dashboard") == "1":
            (name,) = config_map["data"]
            shipped[name] = json.loads(config_map["data"][name])
    assert set(shipped) == {f"{uid}.json" for uid in DASHBOARDS}
    for uid in DASHBOARDS:
        assert shipped[f"{uid}.json"] == load(uid)


def test_dashboards_can_be_switched_off() -> None:
    # values-dev.yaml sets monitoring.dashboards.enabled: false.
    config_maps = of_kind(render_objects("dev"), "ConfigMap")
    assert not [c for c in config_maps if c["metadata"].get("labels", {}).get("grafana_dashboard")]
