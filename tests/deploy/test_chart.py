"""charts/courier verified offline with the real engines: Helm v4 (helm-python-sdk) renders
and lints it, kubernetes-validate checks every object against the 1.29 and 1.33 schemas, and
the cloudcoil models check the CRD objects (KEDA, Prometheus Operator)."""

from __future__ import annotations

import json
import re
from typing import Any

import helm_python
import pytest
from cloudcoil.models.keda.v1alpha1 import ScaledObject, TriggerAuthentication
from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor
from pydantic import BaseModel

from tests.support.deploy import (
    CHART_DIR,
    KUBE_VERSIONS,
    NAMESPACE,
    VALUES_FILES,
    adapter_external_metric_names,
    of_kind,
    pod_spec,
    render_objects,
    validate_crds,
    validate_strict,
    values_for,
)

VARIANTS = list(VALUES_FILES)
SERVICES = {"user-service": 8000, "notification-service": 8001, "dlq-archiver": 8002}
CRD_MODELS: dict[str, type[BaseModel]] = {
    "ScaledObject": ScaledObject,
    "TriggerAuthentication": TriggerAuthentication,
    "ServiceMonitor": ServiceMonitor,
    "PrometheusRule": PrometheusRule,
}


def _deployment(objects: list[dict[str, Any]], service: str) -> dict[str, Any]:
    (found,) = [
        d for d in of_kind(objects, "Deployment") if d["metadata"]["name"] == f"courier-{service}"
    ]
    return found


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _config(objects: list[dict[str, Any]], service: str) -> dict[str, str]:
    (cm,) = [
        c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"] == f"courier-{service}"
    ]
    return dict(cm["data"])


# --- Helm: render, lint, schema -------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_chart_renders_the_three_services(variant: str) -> None:
    objects = render_objects(variant)
    names = {d["metadata"]["name"] for d in of_kind(objects, "Deployment")}
    assert {f"courier-{s}" for s in SERVICES} <= names
    for service, port in SERVICES.items():
        container = _container(_deployment(objects, service))
        assert container["command"] == [service]
        assert container["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
        assert _config(objects, service)["COURIER_HTTP_PORT"] == str(port)
        for kind in ("Service", "ServiceAccount", "PodDisruptionBudget"):
            assert f"courier-{service}" in {o["metadata"]["name"] for o in of_kind(objects, kind)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint_strict_is_clean(variant: str) -> None:
    for kube_version in KUBE_VERSIONS:
        report = helm_python.lint(
            CHART_DIR,
            values_for(variant),
            strict=True,
            namespace=NAMESPACE,
            kube_version=f"v{kube_version}.0",
        )
        assert report["errors"] == [], report
        assert report["messages"] == [], report


@pytest.mark.parametrize(
    ("bad", "where", "why"),
    [
        ({"autoscaling": {"mode": "banana"}}, "/autoscaling/mode", "must be one of"),
        (
            {"services": {"userService": {"replicas": -1}}},
            "/services/userService/replicas",
            "minimum",
        ),
        ({"config": {"logFormat": "xml"}}, "/config/logFormat", "must be one of"),
        ({"replicaCount": 3}, "additional properties 'replicaCount'", "not allowed"),
    ],
)
def test_schema_rejects_bad_values_with_a_clear_error(
    bad: dict[str, Any], where: str, why: str
) -> None:
    with helm_python.Chart.load(CHART_DIR) as chart:
        with pytest.raises(helm_python.HelmValuesError) as excinfo:
            chart.validate_schema(chart.merge_values(bad))
        assert where in str(excinfo.value)
        assert why in str(excinfo.value)
        # Installing with the bad value fails the same way, before anything renders.
        with pytest.raises(helm_python.HelmError, match=re.escape(where)):
            chart.render(bad, name="courier", namespace=NAMESPACE)
    report = helm_python.lint(CHART_DIR, bad, strict=True, namespace=NAMESPACE)
    assert any(where in e for e in report["errors"]), report


def test_every_value_is_commented() -> None:
    """helm create convention: each key in every values file has a comment line above it."""
    key = re.compile(r"^(\s*)([A-Za-z0-9_.\"-]+):")
    for path in sorted(CHART_DIR.glob("values*.yaml")):
        lines = path.read_text().splitlines()
        list_indent: int | None = None
        for number, line in enumerate(lines):
            indent = len(line) - len(line.lstrip())
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            if list_indent is not None and indent > list_indent:
                continue  # inside a list item (e.g. a NetworkPolicy peer): data, not a value
            list_indent = indent if stripped.startswith("- ") else None
            match = key.match(line)
            if match is None:
                continue
            previous = next(p for p in reversed(lines[:number]) if p.strip())
            assert previous.strip().startswith("#"), (
                f"{path.name}:{number + 1} {stripped!r} has no comment"
            )


# --- Kubernetes schemas ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_object_passes_kubernetes_validate_strict(variant: str, kube_version: str) -> None:
    validate_strict(render_objects(variant), kube_version, variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_crd_objects_validate_with_the_cloudcoil_models(variant: str) -> None:
    seen = validate_crds(render_objects(variant), variant)
    keda = {"ScaledObject", "TriggerAuthentication"}
    expected = {
        "default": {"ServiceMonitor", "PrometheusRule", *keda},
        "prod": {"ServiceMonitor", "PrometheusRule", *keda},
        "keda": {"ServiceMonitor", "PrometheusRule", *keda},
        "hpa": {"ServiceMonitor", "PrometheusRule"},
        "none": {"ServiceMonitor", "PrometheusRule"},
        "dev": set(),
    }[variant]
    assert seen == expected


# --- Pod hardening, probes, resources --------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_container_meets_pod_security_restricted(variant: str) -> None:
    pods = [(o, s) for o in render_objects(variant) if (s := pod_spec(o)) is not None]
    assert pods
    for obj, spec in pods:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec.get("automountServiceAccountToken") is False, where
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["runAsNonRoot"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert container["resources"]["requests"], where
            assert container["resources"]["limits"], where


@pytest.mark.parametrize("variant", VARIANTS)
def test_services_have_probes_tmp_and_a_grace_period_longer_than_the_drain(variant: str) -> None:
    objects = render_objects(variant)
    for service in SERVICES:
        deployment = _deployment(objects, service)
        spec = deployment["spec"]["template"]["spec"]
        container = _container(deployment)
        assert container["securityContext"]["runAsUser"] == 10001
        assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert container["readinessProbe"]["timeoutSeconds"] >= 3  # /readyz may take 2 s
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
        assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in spec["volumes"]
        drain = float(_config(objects, service)["COURIER_DRAIN_TIMEOUT_SECONDS"])
        assert spec["terminationGracePeriodSeconds"] >= drain + 20  # + uvicorn's HTTP grace
        assert {c["topologyKey"] for c in spec["topologySpreadConstraints"]} == {
            "kubernetes.io/hostname",
            "topology.kubernetes.io/zone",
        }
        labels = deployment["spec"]["selector"]["matchLabels"]
        assert labels["app.kubernetes.io/component"] == service
        assert container["image"].endswith(":0.1.0" if variant != "dev" else ":dev")


def test_settings_come_from_the_configmap_and_the_existing_secret() -> None:
    objects = render_objects("default")
    retry_keys = (
        "COURIER_RETRY_DELAYS_SECONDS",
        "COURIER_RETRY_MAX_ATTEMPTS",
        "COURIER_DELIVERY_LIMIT",
    )
    configs = {s: _config(objects, s) for s in SERVICES}
    for key in retry_keys:  # every service declares the same queues: must be identical
        assert len({c[key] for c in configs.values()}) == 1, key
    assert json.loads(configs["user-service"]["COURIER_RETRY_DELAYS_SECONDS"]) == [5, 30, 300]
    for service, config in configs.items():
        assert config["COURIER_ENVIRONMENT"] == "production"
        assert config["COURIER_LOG_FORMAT"] == "json"
        assert config["COURIER_HTTP_HOST"] == "0.0.0.0"
        assert config["OTEL_SERVICE_NAME"] == service
    assert configs["notification-service"]["COURIER_SMTP_PORT"] == "587"
    secret_env = {
        service: {
            e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
            for e in _container(_deployment(objects, service))["env"]
        }
        for service in SERVICES
    }
    assert set(secret_env["dlq-archiver"]) == {
        "COURIER_AMQP_URL",
        "COURIER_REDIS_URL",
        "COURIER_ADMIN_TOKEN",
    }
    assert {"COURIER_SMS_TOKEN", "COURIER_PUSH_TOKEN"} <= set(secret_env["notification-service"])
    assert "COURIER_ADMIN_TOKEN" not in secret_env["user-service"]
    assert {name for env in secret_env.values() for name in env.values()} == {"courier-secrets"}
    assert not of_kind(objects, "Secret")  # production uses an existing Secret


# --- Autoscaling -----------------------------------------------------------------------------


def test_hpa_scales_notification_service_on_the_metric_the_adapter_serves() -> None:
    objects = render_objects("hpa")
    assert not of_kind(objects, "ScaledObject")
    (hpa,) = of_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "courier-notification-service",
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] in adapter_external_metric_names()
    assert metric["external"]["metric"]["selector"]["matchLabels"] == {
        "queue": "notification.user-events"
    }
    behavior = hpa["spec"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
    # The HPA owns the replica count: the Deployment must not fight it.
    assert "replicas" not in _deployment(objects, "notification-service")["spec"]


@pytest.mark.parametrize("variant", ["default", "keda", "prod"])
def test_keda_is_the_default_a_scaledobject_over_http_with_secret_auth(variant: str) -> None:
    objects = render_objects(variant)
    values = values_for(variant) or {}
    assert not of_kind(objects, "HorizontalPodAutoscaler")
    (scaled,) = of_kind(objects, "ScaledObject")
    (auth,) = of_kind(objects, "TriggerAuthentication")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "courier-notification-service"
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["protocol"] == "http"  # the management API: ready + unacked
    assert trigger["metadata"]["mode"] == "QueueLength"
    assert trigger["metadata"]["queueName"] == "notification.user-events"
    assert trigger["metadata"]["value"] == "100"
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "host", "name": "courier-secrets", "key": "amqp-management-url"}
    ]
    # Never to zero: the last consumer is never removed while it holds messages.
    assert spec["minReplicaCount"] >= 1
    assert spec["minReplicaCount"] == values.get("autoscaling", {}).get("minReplicas", 2)
    grace = _deployment(objects, "notification-service")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ]
    assert spec["cooldownPeriod"] > grace, "cooldown longer than a worker's drain"
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] > grace
    assert behavior["scaleDown"]["policies"] == [
        {"type": "Percent", "value": 50, "periodSeconds": 60}
    ]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert spec["fallback"]["replicas"] >= spec["minReplicaCount"]
    assert spec["advanced"]["restoreToOriginalReplicaCount"] is False
    # KEDA's HPA owns the replica count: the Deployment must not fight it.
    assert "replicas" not in _deployment(objects, "notification-service")["spec"]


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ({"autoscaling": {"keda": {"cooldownPeriod": 30}}}, "cooldownPeriod (30) must be longer"),
        (
            {"autoscaling": {"scaleDown": {"stabilizationWindowSeconds": 60}}},
            "stabilizationWindowSeconds (60) must be longer",
        ),
    ],
)
def test_autoscaling_shorter_than_the_drain_is_refused(bad: dict[str, Any], why: str) -> None:
    with (
        helm_python.Chart.load(CHART_DIR) as chart,
        pytest.raises(helm_python.HelmError, match=re.escape(why)),
    ):
        chart.render(bad, name="courier", namespace=NAMESPACE)


def test_scale_to_zero_is_refused_by_the_schema() -> None:
    with helm_python.Chart.load(CHART_DIR) as chart:
        with pytest.raises(helm_python.HelmValuesError) as excinfo:
            chart.validate_schema(chart.merge_values({"autoscaling": {"minReplicas": 0}}))
        assert "/autoscaling/minReplicas" in str(excinfo.value)


def test_none_mode_renders_fixed_replicas() -> None:
    objects = render_objects("none")
    assert not of_kind(objects, "HorizontalPodAutoscaler")
    assert not of_kind(objects, "ScaledObject")
    assert _deployment(objects, "notification-service")["spec"]["replicas"] == 2


# --- Network policy, observability, helm test, dev ------------------------------------------


def test_networkpolicy_denies_by_default_and_allows_only_declared_flows() -> None:
    objects = render_objects("default")
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(objects, "NetworkPolicy")}
    # The helm test pod's own policy: it may only resolve names and call user-service.
    test_policy = policies.pop("courier-test-readyz")
    assert "ingress" not in test_policy
    assert test_policy["policyTypes"] == ["Ingress", "Egress"]
    (to_user_service,) = [
        rule for rule in test_policy["egress"] if "to" in rule and rule["ports"][0]["port"] != 53
    ]
    assert to_user_service["ports"] == [{"protocol": "TCP", "port": 8000}]
    deny = policies.pop("courier-default-deny")
    assert deny["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny
    assert "egress" not in deny
    workload_labels = [
        _deployment(objects, s)["spec"]["template"]["metadata"]["labels"] for s in SERVICES
    ]
    for labels in workload_labels:
        assert deny["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policies) == {f"courier-{s}" for s in SERVICES}
    for service, port in SERVICES.items():
        spec = policies[f"courier-{service}"]
        for rule in spec["ingress"]:
            assert rule["ports"] == [{"protocol": "TCP", "port": port}]
        egress_ports = {p["port"] for rule in spec["egress"] for p in rule["ports"]}
        assert {53, 5672, 6379, 4317} <= egress_ports
        assert (587 in egress_ports) == (service == "notification-service")
    assert len(policies["courier-notification-service"]["ingress"]) == 1  # Prometheus only


def test_observability_objects() -> None:
    objects = render_objects("default")
    monitors = {m["metadata"]["name"]: m for m in of_kind(objects, "ServiceMonitor")}
    assert set(monitors) == {f"courier-{s}" for s in SERVICES}
    for service in SERVICES:
        assert monitors[f"courier-{service}"]["spec"]["endpoints"] == [
            {
                "port": "http",
                "path": "/metrics",
                "interval": "30s",
                # dashboards and alerts select services by courier_service (docs/metrics.md)
                "relabelings": [
                    {"action": "replace", "targetLabel": "courier_service", "replacement": service}
                ],
            }
        ]
    (rule,) = of_kind(objects, "PrometheusRule")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"CourierServiceDown", "CourierDeadLettersReceiving", "CourierBacklogGrowing"} <= alerts
    dashboards = [
        c for c in of_kind(objects, "ConfigMap") if "grafana_dashboard" in c["metadata"]["labels"]
    ]
    assert dashboards
    for dashboard in dashboards:
        assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
        for text in dashboard["data"].values():
            assert json.loads(text)["panels"]


def test_helm_test_calls_user_service_readyz() -> None:
    objects = render_objects("default")
    (pod,) = of_kind(objects, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (policy,) = [
        p
        for p in of_kind(objects, "NetworkPolicy")
        if "helm.sh/hook" in p["metadata"].get("annotations", {})
    ]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert int(policy["metadata"]["annotations"]["helm.sh/hook-weight"]) < 0  # before the pod
    assert "http://courier-user-service:8000/readyz" in pod["spec"]["containers"][0]["command"]


def test_dev_values_bring_rabbitmq_redis_and_a_dev_secret() -> None:
    objects = render_objects("dev")
    names = {d["metadata"]["name"] for d in of_kind(objects, "Deployment")}
    assert {"courier-rabbitmq", "courier-redis"} <= names
    (secret,) = of_kind(objects, "Secret")
    assert secret["stringData"]["amqp-url"] == "amqp://guest:guest@courier-rabbitmq:5672/"
    (plugins,) = [
        c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"] == "courier-rabbitmq"
    ]
    assert "rabbitmq_prometheus" in plugins["data"]["enabled_plugins"]
    for service in SERVICES:
        assert _deployment(objects, service)["spec"]["replicas"] == 1
        assert _config(objects, service)["COURIER_ENVIRONMENT"] == "development"
