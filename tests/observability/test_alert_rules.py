"""Courier's alert rules: linted and unit-tested by promtool, documented, and rendered unchanged.

``charts/courier/rules/courier-alerts.yaml`` is the single source: ``promtool check rules``
lints it, ``promtool test rules`` runs the cases in ``tests/observability/rules/`` against it,
every alert needs a case where it fires and one where it stays quiet, every alert links to its
section of ``docs/alerts.md``, selects only metrics and labels ``docs/metrics.md`` lists, and
the chart's PrometheusRule carries exactly its groups.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import helm_python
import pytest

from tests.support.deploy import (
    CHART_DIR,
    NAMESPACE,
    RELEASE,
    load_yaml_docs,
    load_yaml_file,
    of_kind,
    render_objects,
)
from tests.support.prometheus import require_binary

ROOT = Path(__file__).resolve().parents[2]
RULES = CHART_DIR / "rules" / "courier-alerts.yaml"
TESTS_DIR = Path(__file__).resolve().parent / "rules"
TEST_FILES = sorted(TESTS_DIR.glob("*.yaml"))
RUNBOOK = ROOT / "docs" / "alerts.md"
CATALOG = ROOT / "docs" / "metrics.md"
#: Labels Prometheus adds to every scraped series (docs/metrics.md), and the histogram bucket.
TARGET_LABELS = {"namespace", "courier_service", "job", "instance", "pod", "le"}
SEVERITIES = {"warning", "critical"}
#: PromQL words that look like identifiers in an expression but are not metric names.
PROMQL_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk",
    "bottomk", "quantile", "count_values", "rate", "irate", "increase", "delta", "deriv",
    "histogram_quantile", "label_replace", "time", "absent", "vector", "scalar",
}  # fmt: skip


def promtool() -> str:
    return require_binary("promtool")


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, check=False, timeout=120
    )


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = load_yaml_file(RULES)["groups"]
    return groups


def alerts() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for group in rule_groups():
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["alert"] not in found, f"{rule['alert']} is defined twice"
                found[rule["alert"]] = rule
    return found


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    anchors = set()
    for line in markdown.splitlines():
        heading = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if heading:
            text = heading.group(1).strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


def catalog() -> dict[str, set[str]]:
    """Metric family → label names, from every table of docs/metrics.md."""
    families: dict[str, set[str]] = {}
    for line in CATALOG.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3:
            continue
        name = re.fullmatch(r"`([a-zA-Z_:][a-zA-Z0-9_:]*)`", cells[0])
        if name is None:
            continue
        labels = set(re.findall(r"`([a-zA-Z_][a-zA-Z0-9_]*)`", cells[2]))
        families[name.group(1)] = labels
        if cells[1] == "histogram":
            for suffix in ("_bucket", "_count", "_sum"):
                families[name.group(1) + suffix] = labels
    families["up"] = set()  # Prometheus's own per-target series
    return families


# --- promtool ------------------------------------------------------------------------------


def test_rules_file_passes_promtool_check() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, f"promtool check rules:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("test_file", TEST_FILES, ids=[p.name for p in TEST_FILES])
def test_promtool_unit_tests_pass(test_file: Path) -> None:
    result = run_promtool("test", "rules", str(test_file))
    assert result.returncode == 0, f"promtool test rules:\n{result.stdout}{result.stderr}"


def test_unit_tests_load_the_charts_rules_file() -> None:
    assert TEST_FILES, f"no promtool test files in {TESTS_DIR}"
    for test_file in TEST_FILES:
        rule_files = load_yaml_file(test_file)["rule_files"]
        assert [(test_file.parent / f).resolve() for f in rule_files] == [RULES], test_file.name


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for test_file in TEST_FILES:
        for case in load_yaml_file(test_file)["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    defined = set(alerts())
    # promtool passes `exp_alerts: []` for a name no rule defines: catch typos here.
    assert (firing | quiet) <= defined, f"tests name unknown alerts: {(firing | quiet) - defined}"
    assert defined - firing == set(), "alerts without a case where they fire"
    assert defined - quiet == set(), "alerts without a case where they stay quiet"


# --- conventions and the runbook -------------------------------------------------------------


def test_every_alert_has_severity_annotations_and_a_runbook_section() -> None:
    home = load_yaml_file(CHART_DIR / "Chart.yaml")["home"]
    anchors = github_anchors(RUNBOOK.read_text())
    assert alerts()
    for name, rule in alerts().items():
        assert name.startswith("Courier"), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations), name
        assert annotations["summary"].strip(), name
        assert annotations["description"].strip(), name
        url = annotations["runbook_url"]
        assert url == f"{home}/blob/main/docs/alerts.md#{name.lower()}", (name, url)
        assert name.lower() in anchors, f"docs/alerts.md has no section for {name}"


def test_exprs_use_only_catalogued_metrics_and_labels() -> None:
    families = catalog()
    known_labels = TARGET_LABELS.union(*families.values())
    for name, rule in alerts().items():
        expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', rule["expr"])  # string literals out
        labels: set[str] = set()
        for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
            labels |= {label.strip() for label in clause.split(",") if label.strip()}
        expr = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
        for metric, matchers in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", expr):
            selected = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
            allowed = families.get(metric, set()) | TARGET_LABELS
            assert selected <= allowed, f"{name}: {metric} has no label {selected - allowed}"
        expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
        words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b(?!\s*\()", expr))
        metrics = {w for w in words if w not in PROMQL_WORDS and not re.fullmatch(r"\d+\w*", w)}
        assert metrics, name
        assert metrics <= set(families), (
            f"{name}: not in docs/metrics.md: {metrics - set(families)}"
        )
        assert labels <= known_labels, f"{name}: unknown labels {labels - known_labels}"
        # Courier series are aggregated by namespace; RabbitMQ series by vhost and queue.
        aggregates = re.search(r"\bby\s*\(", rule["expr"]) is not None
        if aggregates and not any(m.startswith("rabbitmq_") for m in metrics):
            assert "namespace" in labels, f"{name}: Courier series not aggregated by namespace"


# --- the chart -------------------------------------------------------------------------------


def _render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm_python.Chart.load(CHART_DIR) as chart:
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    objects: list[dict[str, Any]] = []
    for template, text in rendered.items():
        if template.endswith("prometheusrule.yaml"):
            objects.extend(load_yaml_docs(text))
    return objects


@pytest.mark.parametrize("variant", ["default", "prod", "keda", "hpa", "none"])
def test_chart_prometheusrule_has_exactly_the_rules_files_groups(variant: str) -> None:
    (rule,) = of_kind(render_objects(variant), "PrometheusRule")
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert rule["spec"]["groups"] == rule_groups()


def test_disabled_alerts_are_left_out_and_unknown_names_refused() -> None:
    values = {"monitoring": {"prometheusRule": {"disabledAlerts": ["CourierBacklogGrowing"]}}}
    (rule,) = of_kind(_render(values), "PrometheusRule")
    rendered = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert rendered == set(alerts()) - {"CourierBacklogGrowing"}
    typo = {"monitoring": {"prometheusRule": {"disabledAlerts": ["CourierBacklogGrowin"]}}}
    with pytest.raises(helm_python.HelmError, match="no alert named"):
        _render(typo)
