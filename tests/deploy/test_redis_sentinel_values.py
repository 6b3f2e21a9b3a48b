"""The chart's Sentinel settings and the Redis Sentinel add-on agree with what Courier needs."""

from __future__ import annotations

import re
from typing import Any

import helm_python
import pytest

from courier_common.settings import CourierSettings
from tests.support.deploy import CHART_DIR, K8S_DIR, NAMESPACE, load_yaml_docs, load_yaml_file

SENTINELS = "redis-node-0.redis-headless:26379,redis-node-1.redis-headless:26379"


def _configs(values: dict[str, Any]) -> list[dict[str, str]]:
    with helm_python.Chart.load(CHART_DIR) as chart:
        rendered = chart.render(values, name="courier", namespace=NAMESPACE)
    objects = [
        doc
        for template, text in rendered.items()
        if template.endswith(".yaml")
        for doc in load_yaml_docs(text)
    ]
    return [dict(o["data"]) for o in objects if o["kind"] == "ConfigMap" and "data" in o]


def test_sentinel_values_reach_every_service_and_parse_as_settings() -> None:
    configs = _configs(
        {
            "config": {
                "redisSentinels": SENTINELS,
                "redisSentinelService": "courier",
                "redisMinReplicas": 1,
            }
        }
    )
    services = [c for c in configs if "OTEL_SERVICE_NAME" in c]
    assert len(services) == 3
    for config in services:
        assert config["COURIER_REDIS_SENTINELS"] == SENTINELS
        assert config["COURIER_REDIS_SENTINEL_SERVICE"] == "courier"
        assert config["COURIER_REDIS_MIN_REPLICAS"] == "1"
        # What the services will make of it: the settings accept the rendered values.
        settings = CourierSettings.model_validate(
            {
                key.removeprefix("COURIER_").lower(): value
                for key, value in config.items()
                if key.startswith("COURIER_REDIS_")
            }
        )
        assert settings.redis_replicas_required == 1
        assert settings.redis_target().service == "courier"


def test_without_sentinels_nothing_sentinel_is_rendered() -> None:
    for config in _configs({}):
        if "OTEL_SERVICE_NAME" in config:
            assert not [k for k in config if k.startswith("COURIER_REDIS_SENTINEL")]
            assert "COURIER_REDIS_MIN_REPLICAS" not in config
            assert config["COURIER_REDIS_REPLICA_TIMEOUT_MS"] == "1000"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"redisSentinels": "not a list of host:port"}, "/config/redisSentinels"),
        ({"redisMinReplicas": -1}, "/config/redisMinReplicas"),
        ({"redisReplicaTimeoutMs": 0}, "/config/redisReplicaTimeoutMs"),
        ({"redisSentinels": SENTINELS}, "config.redisSentinelService"),
    ],
)
def test_bad_sentinel_values_are_refused(bad: dict[str, Any], message: str) -> None:
    with (
        helm_python.Chart.load(CHART_DIR) as chart,
        pytest.raises(helm_python.HelmError, match=re.escape(message)),
    ):
        chart.render({"config": bad}, name="courier", namespace=NAMESPACE)


def test_the_redis_sentinel_addon_is_what_the_guarantee_needs() -> None:
    values = load_yaml_file(K8S_DIR / "addons" / "redis-sentinel-values.yaml")
    assert values["architecture"] == "replication"
    sentinel = values["sentinel"]
    assert sentinel["enabled"] is True
    nodes = values["replica"]["replicaCount"]
    assert nodes >= 3, "a primary and two replicas: a failover must leave a replica"
    assert sentinel["quorum"] == nodes // 2 + 1, "a majority of the Sentinels"
    config = values["commonConfiguration"].splitlines()
    assert "appendonly yes" in config
    assert "appendfsync always" in config
    readme = (K8S_DIR / "addons" / "README.md").read_text()
    assert "redis-sentinel-values.yaml" in readme
    assert (
        f"config.redisSentinelService: {sentinel['masterSet']}"
        in (K8S_DIR / "addons" / "redis-sentinel-values.yaml").read_text()
    )
