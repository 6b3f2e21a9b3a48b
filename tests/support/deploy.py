"""Helpers for the deployment tests: render charts/courier offline and read k8s/."""

from __future__ import annotations

import functools
import importlib
import re
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate  # type: ignore[import-untyped]  # ships no py.typed
import pytest
from cloudcoil.models.keda.v1alpha1 import ScaledObject, TriggerAuthentication
from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor
from pydantic import BaseModel

# Loaded this way so the module type-checks with or without types-PyYAML installed.
yaml: Any = importlib.import_module("yaml")

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "courier"
K8S_DIR = ROOT / "k8s"
RELEASE = "courier"
NAMESPACE = "courier"

#: The values files the chart ships, by the name the tests use (None: values.yaml only).
VALUES_FILES: dict[str, str | None] = {
    "default": None,
    "dev": "values-dev.yaml",
    "prod": "values-prod.yaml",
    "keda": "values-keda.yaml",
    "hpa": "values-hpa.yaml",
    "none": "values-none.yaml",
}

#: Kubernetes versions every rendered object must validate against.
KUBE_VERSIONS = ("1.29", "1.33")

#: Kinds that are CRDs (no kubernetes-validate schema): validated with the cloudcoil models.
CRD_KINDS = frozenset({"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"})
CRD_MODELS: dict[str, type[BaseModel]] = {
    "ScaledObject": ScaledObject,
    "TriggerAuthentication": TriggerAuthentication,
    "ServiceMonitor": ServiceMonitor,
    "PrometheusRule": PrometheusRule,
}


def validate_strict(objects: list[dict[str, Any]], kube_version: str, where: str) -> None:
    """Every non-CRD object against the Kubernetes schema of ``kube_version``, strictly."""
    checked = [o for o in objects if o["kind"] not in CRD_KINDS]
    assert checked, f"{where}: nothing to validate"
    for obj in checked:
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(
                f"{where}: {obj['kind']}/{obj['metadata']['name']} ({kube_version}): "
                f"{error.message}"
            )


def validate_crds(objects: list[dict[str, Any]], where: str) -> set[str]:
    """The CRD objects against their models, losslessly; returns the kinds seen."""
    kinds: set[str] = set()
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            model = CRD_MODELS[obj["kind"]].model_validate(obj)
            # The models ignore unknown fields; a lossless round trip proves there are none.
            dumped = model.model_dump(mode="json", by_alias=True, exclude_unset=True)
            assert dumped == obj, f"{where}: {obj['kind']}/{obj['metadata']['name']}"
            kinds.add(obj["kind"])
    return kinds


def load_yaml_file(path: Path) -> Any:
    """One YAML document from a file."""
    return yaml.safe_load(path.read_text())


def load_yaml_docs(text: str) -> list[dict[str, Any]]:
    """Every non-empty document of a multi-document YAML string."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def values_for(variant: str) -> dict[str, Any] | None:
    """The user-supplied values of a variant (what `helm -f values-<variant>.yaml` passes)."""
    name = VALUES_FILES[variant]
    if name is None:
        return None
    loaded: dict[str, Any] = load_yaml_file(CHART_DIR / name)
    return loaded


@functools.cache
def _render_cached(variant: str) -> tuple[tuple[str, str], ...]:
    with helm_python.Chart.load(CHART_DIR) as chart:
        rendered = chart.render(values_for(variant), name=RELEASE, namespace=NAMESPACE)
    return tuple(sorted(rendered.items()))


def render(variant: str) -> dict[str, str]:
    """Template path → rendered text for a values variant (cached per variant)."""
    return dict(_render_cached(variant))


def render_objects(variant: str) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders for a variant, helm test hooks included."""
    objects: list[dict[str, Any]] = []
    for template, text in render(variant).items():
        if template.endswith((".yaml", ".yml")):
            objects.extend(load_yaml_docs(text))
    return objects


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The objects of one kind."""
    return [o for o in objects if o["kind"] == kind]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The pod spec of a Pod or a workload, or None for other kinds."""
    if obj["kind"] == "Pod":
        spec: dict[str, Any] = obj["spec"]
        return spec
    template = obj.get("spec", {}).get("template")
    return None if template is None else template["spec"]


def adapter_external_metric_names() -> set[str]:
    """Names the prometheus-adapter rule in k8s/addons exposes as External metrics.

    Applies each rule's `name.matches` / `name.as` to the metric of its `seriesQuery`, the
    way prometheus-adapter does (`$1` is the first capture group).
    """
    config = load_yaml_file(K8S_DIR / "addons" / "prometheus-adapter-rules.yaml")
    names: set[str] = set()
    for rule in config["rules"]["external"]:
        series = re.match(r"^\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"])
        assert series, f"cannot read a metric name from {rule['seriesQuery']!r}"
        metric = series.group(1)
        naming = rule.get("name", {})
        pattern = naming.get("matches", "^(.*)$")
        match = re.search(pattern, metric)
        assert match, f"{pattern!r} does not match {metric!r}"
        template = naming.get("as", "$1") or "$1"
        # prometheus-adapter writes groups as $1; Python's Match.expand wants \1.
        names.add(match.expand(re.sub(r"\$(\d+)", r"\\\1", template)))
    return names
