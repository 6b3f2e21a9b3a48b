"""skaffold.yaml: every path it names exists, every profile deploys something complete, and
the images skaffold builds are the ones the chart and the kustomize overlay end up running.

No skaffold binary runs here: profiles are applied the way skaffold applies them (JSON
patches on the config), the chart is rendered with Helm's own engine (helm-python-sdk) using
the values skaffold would pass, and the overlay's image names are followed through kustomize's
``images`` transformer.
"""

from __future__ import annotations

import copy
import importlib
import re
from pathlib import Path
from typing import Any

import helm_python
import pytest

from tests.support.images import REPO_ROOT, SERVICE_DOCKERFILE, default_http_port

# Loaded this way so the module type-checks with or without types-PyYAML installed.
yaml: Any = importlib.import_module("yaml")

SKAFFOLD = REPO_ROOT / "skaffold.yaml"
SERVICES = sorted(p.parent.name for p in (REPO_ROOT / "services").glob("*/pyproject.toml"))
PROFILES = ["dev", "kustomize", "keda"]
VARIANTS: list[str | None] = [None, *PROFILES]
RELEASE = "courier"

#: The chart's key for each service (services.<key>.image.repository / .tag).
CHART_KEYS = {
    "user-service": "userService",
    "notification-service": "notificationService",
    "dlq-archiver": "dlqArchiver",
}


def load_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(SKAFFOLD.read_text())
    return config


def profile(config: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [p for p in config.get("profiles", []) if p["name"] == name]
    return dict(found)


def effective(variant: str | None) -> dict[str, Any]:
    """The config with one profile applied, as skaffold applies it."""
    config = load_config()
    result = {k: copy.deepcopy(v) for k, v in config.items() if k != "profiles"}
    if variant is None:
        return result
    chosen = profile(config, variant)
    for section in ("build", "test", "manifests", "deploy", "portForward"):
        if section in chosen:  # a section written in a profile replaces the main one
            result[section] = copy.deepcopy(chosen[section])
    for patch in chosen.get("patches", []):
        apply_patch(result, patch)
    return result


def apply_patch(document: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 6902 add / replace / remove on object members: all skaffold.yaml may use."""
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in patch["path"][1:].split("/")]
    target: Any = document
    for part in parents:
        target = target[part]
    op = patch["op"]
    if op == "add":
        target[last] = copy.deepcopy(patch["value"])
    elif op == "replace":
        assert last in target, f"replace {patch['path']}: nothing there to replace"
        target[last] = copy.deepcopy(patch["value"])
    elif op == "remove":
        del target[last]
    else:
        raise AssertionError(f"unsupported patch op {op!r}")


def template_name(image: str) -> str:
    """Skaffold's name for an artifact in templates: IMAGE_REPO_<this>, IMAGE_TAG_<this>."""
    return re.sub(r"[^A-Za-z0-9]", "_", image)


def artifact_images(variant: str | None = None) -> dict[str, str]:
    """Service → the image skaffold builds for it (services only, not the dev sinks)."""
    images = {}
    for artifact in effective(variant)["build"]["artifacts"]:
        if Path(artifact["docker"]["dockerfile"]) == SERVICE_DOCKERFILE.relative_to(REPO_ROOT):
            images[artifact["docker"]["buildArgs"]["PACKAGE"]] = artifact["image"]
    return images


#: Dev-only images: the chart value each is set through (a fully qualified reference).
DEV_IMAGES = {"courier/sinks": "devDependencies.sinksImage"}
#: The Deployments that run the sinks image in the dev profile.
SINK_DEPLOYMENTS = {f"{RELEASE}-smtp-sink", f"{RELEASE}-http-sink"}


def built_images(variant: str | None) -> list[str]:
    return [a["image"] for a in effective(variant)["build"]["artifacts"]]


def exposed_port(service: str) -> int:
    """The HTTP_PORT skaffold builds the service's image with (its EXPOSE), which must be the
    service's own default port."""
    (artifact,) = [
        a
        for a in load_config()["build"]["artifacts"]
        if a["docker"].get("buildArgs", {}).get("PACKAGE") == service
    ]
    port = int(artifact["docker"]["buildArgs"]["HTTP_PORT"])
    package = service.replace("-", "_")
    config = REPO_ROOT / "services" / service / "src" / package / "config.py"
    assert port == default_http_port(config), f"{service}: HTTP_PORT {port}"
    return port


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def helm_values(release: dict[str, Any], fake: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """What `helm upgrade --install` gets from skaffold: -f each values file, then --set each
    setValues and setValueTemplates entry (templates filled with ``fake`` repo/tag pairs)."""
    values: dict[str, Any] = {}
    for path in release.get("valuesFiles", []):
        values = deep_merge(values, yaml.safe_load((REPO_ROOT / path).read_text()) or {})
    variables = {}
    for image, (repo, tag) in fake.items():
        variables[f"IMAGE_REPO_{template_name(image)}"] = repo
        variables[f"IMAGE_TAG_{template_name(image)}"] = tag
        variables[f"IMAGE_FULLY_QUALIFIED_{template_name(image)}"] = f"{repo}:{tag}"
    entries = dict(release.get("setValues", {}))
    for key, template in release.get("setValueTemplates", {}).items():
        entries[key] = re.sub(r"\{\{\s*\.(\w+)\s*\}\}", lambda m: variables[m.group(1)], template)
    for key, value in entries.items():
        values = deep_merge(values, helm_python.parse_set_string(f"{key}={value}"))
    return values


def render_release(release: dict[str, Any], fake: dict[str, tuple[str, str]]) -> list[Any]:
    with helm_python.Chart.load(REPO_ROOT / release["chartPath"]) as chart:
        rendered = chart.render(helm_values(release, fake), name=release["name"])
    return [
        doc
        for path, text in sorted(rendered.items())
        if path.endswith((".yaml", ".yml"))
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def container_images(objects: list[Any]) -> dict[str, str]:
    """Deployment name → its one container's image."""
    images = {}
    for obj in objects:
        if obj.get("kind") == "Deployment":
            (container,) = obj["spec"]["template"]["spec"]["containers"]
            images[obj["metadata"]["name"]] = container["image"]
    return images


def kustomize_images(directory: Path) -> dict[str, str]:
    """Deployment name → image after kustomize's ``images`` transformers, inner levels first
    (the subset of kustomize that decides which image a Deployment runs)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    images: dict[str, str] = {}
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir():
            images.update(kustomize_images(path))
        else:
            images.update(container_images(list(yaml.safe_load_all(path.read_text()))))
    for rule in kustomization.get("images", []):
        for deployment, image in images.items():
            name, tag = split_image(image)
            if name == rule["name"]:
                images[deployment] = f"{rule.get('newName', name)}:{rule.get('newTag', tag)}"
    return images


def split_image(image: str) -> tuple[str, str]:
    name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
    return name, tag


# ---- the config itself -------------------------------------------------------------------


def test_is_a_v4_config_with_the_three_profiles() -> None:
    config = load_config()
    assert re.fullmatch(r"skaffold/v4beta\d+", config["apiVersion"])
    assert config["kind"] == "Config"
    assert [p["name"] for p in config["profiles"]] == PROFILES


def test_builds_one_image_per_service_from_the_repository_root() -> None:
    config = load_config()
    assert config["build"]["local"]["useBuildkit"] is True  # RUN --mount=type=cache
    artifacts = config["build"]["artifacts"]
    assert sorted(a["image"] for a in artifacts) == [f"courier/{s}" for s in SERVICES]
    for artifact in artifacts:
        context = REPO_ROOT / artifact["context"]
        assert context.resolve() == REPO_ROOT, "the services share the workspace: root context"
        dockerfile = context / artifact["docker"]["dockerfile"]
        assert dockerfile == SERVICE_DOCKERFILE, "one Dockerfile for every service"
        assert artifact["image"] == f"courier/{artifact['docker']['buildArgs']['PACKAGE']}"


def test_dev_profile_also_builds_the_sinks_image() -> None:
    default = load_config()["build"]
    dev = effective("dev")["build"]
    assert dev["local"] == default["local"]
    assert dev["artifacts"][: len(default["artifacts"])] == default["artifacts"]
    assert built_images("dev") == [*built_images(None), "courier/sinks"]
    for artifact in dev["artifacts"]:
        assert (REPO_ROOT / artifact["context"] / artifact["docker"]["dockerfile"]).is_file()
    for variant in ("kustomize", "keda"):
        assert "courier/sinks" not in built_images(variant)


def test_profiles_replace_whole_sections_never_array_elements() -> None:
    for p in load_config()["profiles"]:
        for patch in p.get("patches", []):
            path = patch["path"]
            assert not re.search(r"/(\d+|-)(/|$)", path), f"{p['name']}: index patch {path}"
            assert path.count("/") == 1, f"{p['name']}: patch a whole section, not {path}"
            assert patch["op"] in {"add", "replace", "remove"}


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v or "default")
def test_deploys_exactly_one_way(variant: str | None) -> None:
    deploy = effective(variant)["deploy"]
    assert len(deploy) == 1, f"one deployer, not {sorted(deploy)}"
    (kind,) = deploy
    assert kind == ("kubectl" if variant == "kustomize" else "helm")


# ---- helm variants -----------------------------------------------------------------------

HELM_VARIANTS: list[str | None] = [v for v in VARIANTS if v != "kustomize"]


def release_of(variant: str | None) -> dict[str, Any]:
    (release,) = effective(variant)["deploy"]["helm"]["releases"]
    return dict(release)


@pytest.mark.parametrize("variant", HELM_VARIANTS, ids=lambda v: v or "default")
def test_helm_release_paths_exist(variant: str | None) -> None:
    release = release_of(variant)
    assert release["name"] == RELEASE
    assert (REPO_ROOT / release["chartPath"] / "Chart.yaml").is_file()
    assert release["valuesFiles"], "dev values at least"
    for path in release["valuesFiles"]:
        assert (REPO_ROOT / path).is_file(), f"{path} is missing"
    assert "manifests" not in effective(variant), "helm renders; no second renderer"


@pytest.mark.parametrize("variant", HELM_VARIANTS, ids=lambda v: v or "default")
def test_helm_release_sets_every_built_image(variant: str | None) -> None:
    templates = release_of(variant)["setValueTemplates"]
    expected = {
        key: f"{{{{.IMAGE_FULLY_QUALIFIED_{template_name(image)}}}}}"
        for image, key in DEV_IMAGES.items()
        if image in built_images(variant)
    }
    for service, image in artifact_images().items():
        key = f"services.{CHART_KEYS[service]}.image"
        expected[f"{key}.repository"] = f"{{{{.IMAGE_REPO_{template_name(image)}}}}}"
        expected[f"{key}.tag"] = f"{{{{.IMAGE_TAG_{template_name(image)}}}}}"
    assert templates == expected


@pytest.mark.parametrize("variant", HELM_VARIANTS, ids=lambda v: v or "default")
def test_chart_runs_the_images_skaffold_built(variant: str | None) -> None:
    fake = {
        image: (f"registry.test/{image}", f"sha-{n}")
        for n, image in enumerate(built_images(variant))
    }
    objects = render_release(release_of(variant), fake)
    running = container_images(objects)
    for service, image in artifact_images().items():
        repo, tag = fake[image]
        assert running[f"{RELEASE}-{service}"] == f"{repo}:{tag}"
    kinds = {o["kind"] for o in objects}
    if variant == "keda":
        assert "ScaledObject" in kinds
        assert "HorizontalPodAutoscaler" not in kinds
    dev_dependencies = {
        o["metadata"]["name"]
        for o in objects
        if o["kind"] in {"Deployment", "StatefulSet"}
        and o["metadata"]["name"] not in {f"{RELEASE}-{s}" for s in SERVICES}
    }
    if variant == "dev":
        assert dev_dependencies, "-p dev brings RabbitMQ and Redis"
        repo, tag = fake["courier/sinks"]
        for name in SINK_DEPLOYMENTS:
            assert running[name] == f"{repo}:{tag}", f"{name} runs the sinks image skaffold built"
    else:
        assert not dev_dependencies, f"only -p dev deploys dependencies: {dev_dependencies}"


def test_profiles_differ_from_the_default_only_where_they_say() -> None:
    default = release_of(None)
    dev, keda = release_of("dev"), release_of("keda")
    assert dev["valuesFiles"] == default["valuesFiles"]
    assert dev["setValues"] == {**default["setValues"], "devDependencies.enabled": "true"}
    assert keda["valuesFiles"] == [*default["valuesFiles"], "charts/courier/values-keda.yaml"]
    assert keda["setValues"] == default["setValues"]
    assert dev["setValueTemplates"] == {
        **default["setValueTemplates"],
        "devDependencies.sinksImage": "{{.IMAGE_FULLY_QUALIFIED_courier_sinks}}",
    }
    assert keda["setValueTemplates"] == default["setValueTemplates"]
    for release in (dev, keda):
        assert release["chartPath"] == default["chartPath"]


# ---- kustomize variant -------------------------------------------------------------------


def test_kustomize_profile_paths_exist_and_run_the_built_images() -> None:
    config = effective("kustomize")
    assert config["deploy"] == {"kubectl": {}}
    paths = config["manifests"]["kustomize"]["paths"]
    assert paths == ["k8s/overlays/dev"]
    for path in paths:
        overlay = REPO_ROOT / path
        assert (overlay / "kustomization.yaml").is_file(), f"{path} has no kustomization.yaml"
        running = kustomize_images(overlay)
        for service, image in artifact_images().items():
            name, _ = split_image(running[f"{RELEASE}-{service}"])
            # skaffold swaps in what it built wherever the artifact's image name appears
            assert name == image, (
                f"{path}: {RELEASE}-{service} runs {name}; the overlay must rename it to {image} "
                "(kustomization `images:`) for skaffold to deploy its build"
            )


# ---- port forwarding ---------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v or "default")
def test_forwards_each_service_on_its_port(variant: str | None) -> None:
    config = effective(variant)
    forwards = {f["resourceName"]: f for f in config["portForward"]}
    namespace = None
    if variant == "kustomize":
        base = REPO_ROOT / "k8s" / "base" / "kustomization.yaml"
        namespace = yaml.safe_load(base.read_text()).get("namespace")
    for service in SERVICES:
        forward = forwards[f"{RELEASE}-{service}"]
        assert forward["resourceType"] == "service"
        assert forward["port"] == forward["localPort"] == exposed_port(service)
        assert forward.get("namespace") == namespace
