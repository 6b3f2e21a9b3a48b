"""Each image runs as charts/courier runs its pod, against the shared RabbitMQ and Redis.

The chart is rendered (Helm's engine) with the values an operator would set for this
machine: the services' ports (host network: three pods, one network namespace), the SMTP,
SMS and push endpoints (the sinks image), the Redis prefix of this test. Each Deployment's
container becomes `docker run`: its command as the entrypoint, the environment the kubelet
would build (ConfigMap, then the Secret: a RabbitMQ user made for this test, since production
refuses guest), readOnlyRootFilesystem with each emptyDir mount as a tmpfs of its sizeLimit,
runAsUser/runAsGroup, capabilities dropped, allowPrivilegeEscalation false (no new
privileges), the memory and CPU limits, and SIGTERM with terminationGracePeriodSeconds.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python
import httpx
import pytest
import redis

from courier_testing.backing import REDIS_URL, BrokerAdmin, BrokerVhost
from tests.images.conftest import Engine
from tests.support.deploy import CHART_DIR, NAMESPACE, RELEASE, load_yaml_docs, of_kind
from tests.support.kube import broker_user, container_port, free_port, resolve_env

CHART_KEYS = {
    "user-service": "userService",
    "notification-service": "notificationService",
    "dlq-archiver": "dlqArchiver",
}
ADMIN_TOKEN = secrets.token_urlsafe(24)


@dataclass
class Container:
    name: str
    argv: list[str]
    grace_seconds: float
    probes: list[tuple[str, str]] = field(default_factory=list)  # (what, url)
    id: str = ""


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm_python.Chart.load(CHART_DIR) as chart:
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return [
        doc
        for path, text in sorted(rendered.items())
        if path.endswith(".yaml")
        for doc in load_yaml_docs(text)
    ]


def _quantity_bytes(value: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    match = re.fullmatch(r"(\d+)([KMG]i?)?", str(value))
    assert match, f"memory quantity {value!r}"
    return int(match.group(1)) * units.get(match.group(2) or "", 1)


def _cpus(value: str) -> str:
    text = str(value)
    return str(int(text[:-1]) / 1000) if text.endswith("m") else text


def docker_run_argv(
    deployment: dict[str, Any], image: str, env_file: Path, name: str
) -> tuple[list[str], dict[str, Any]]:
    """`docker run` for the Deployment's one container, as the kubelet would run it."""
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    pod_sc, sc = spec.get("securityContext", {}), container["securityContext"]
    argv = ["run", "-d", "--name", name, "--network", "host", "--env-file", str(env_file)]
    assert sc["readOnlyRootFilesystem"] is True
    argv.append("--read-only")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        assert "emptyDir" in volume, f"{name}: only emptyDir volumes are run here"
        size = _quantity_bytes(volume["emptyDir"].get("sizeLimit", "64Mi"))
        argv += ["--tmpfs", f"{mount['mountPath']}:rw,nosuid,nodev,size={size},mode=1777"]
    user = sc.get("runAsUser", pod_sc.get("runAsUser"))
    group = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    assert user, f"{name}: runAsUser"
    assert group, f"{name}: runAsGroup"
    argv += ["--user", f"{user}:{group}"]
    if pod_sc.get("fsGroup"):
        argv += ["--group-add", str(pod_sc["fsGroup"])]
    for cap in sc["capabilities"]["drop"]:
        argv += ["--cap-drop", cap]
    if sc.get("allowPrivilegeEscalation") is False:
        argv += ["--security-opt", "no-new-privileges"]
    limits = container.get("resources", {}).get("limits", {})
    if "memory" in limits:
        argv += ["--memory", str(_quantity_bytes(limits["memory"]))]
    if "cpu" in limits:
        argv += ["--cpus", _cpus(limits["cpu"])]
    command = [*container["command"], *container.get("args", [])]
    argv += ["--entrypoint", command[0], image, *command[1:]]
    return argv, container


@pytest.fixture(scope="module")
def stack(engine: Engine, images: dict[str, str]) -> Iterator[dict[str, Container]]:
    """The sinks and the three services as containers; removed (and the vhost, the user and
    the Redis keys with them) afterwards."""
    admin = BrokerAdmin()
    admin.check()
    run_id = f"{os.getpid()}-{secrets.token_hex(3)}"
    vhost = BrokerVhost(f"courier-test-{run_id}-images")
    prefix = f"courier-test:{run_id}:images:"
    smtp, control, http = free_port(), free_port(), free_port()
    ports = {service: free_port() for service in CHART_KEYS}
    values = {
        "config": {
            "redisPrefix": prefix,
            "smtpHost": "127.0.0.1",
            "smtpPort": smtp,
            "smsUrl": f"http://127.0.0.1:{http}/sms",
            "pushUrl": f"http://127.0.0.1:{http}/push",
        },
        "services": {key: {"port": ports[s]} for s, key in CHART_KEYS.items()},
    }
    objects = render(values)
    containers: dict[str, Container] = {}
    admin.create_vhost(vhost.name)
    tmp = tempfile.TemporaryDirectory(prefix="courier-images-run-")
    try:
        with broker_user(admin, vhost) as amqp_url:
            secret = {
                "amqp-url": amqp_url,
                "redis-url": REDIS_URL,
                "admin-token": ADMIN_TOKEN,
                "sms-token": "sk_test_" + secrets.token_hex(16),
                "push-token": "pk_test_" + secrets.token_hex(16),
            }
            # The dev sinks, with the command the chart's dev values give them, on free ports.
            sink_ports = {"1025": str(smtp), "8025": str(control), "8030": str(http)}
            for sink in of_kind(render({"devDependencies": {"enabled": True}}), "Deployment"):
                if not sink["metadata"]["name"].endswith("-sink"):
                    continue
                (container,) = sink["spec"]["template"]["spec"]["containers"]
                container["command"] = [
                    sink_ports.get(a, "127.0.0.1" if a == "0.0.0.0" else a)
                    for a in container["command"]
                ]
                probe = container["readinessProbe"]["httpGet"]
                port = sink_ports[str(container_port(container, probe["port"]))]
                containers[sink["metadata"]["name"]] = _start(
                    engine,
                    sink,
                    images["sinks"],
                    {},
                    Path(tmp.name),
                    run_id,
                    [("readinessProbe", f"http://127.0.0.1:{port}{probe['path']}")],
                )
            for deployment in of_kind(objects, "Deployment"):
                service = deployment["metadata"]["name"].removeprefix(f"{RELEASE}-")
                (container,) = deployment["spec"]["template"]["spec"]["containers"]
                env = resolve_env(container, objects, {"courier-secrets": secret})
                assert env["COURIER_ENVIRONMENT"] == "production"
                assert env["COURIER_HTTP_PORT"] == str(ports[service])
                checks = [
                    (kind, f"http://127.0.0.1:{ports[service]}{container[kind]['httpGet']['path']}")
                    for kind in ("startupProbe", "livenessProbe", "readinessProbe")
                ]
                checks.append(("metrics", f"http://127.0.0.1:{ports[service]}/metrics"))
                containers[service] = _start(
                    engine, deployment, images[service], env, Path(tmp.name), run_id, checks
                )
            for container in containers.values():
                _wait_for_probes(engine, container, budget=60)
            yield containers
    finally:
        for container in containers.values():
            if container.id:
                engine.run("rm", "-f", container.id, check=False)
        admin.delete_vhost(vhost.name)
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
        admin.client.close()
        tmp.cleanup()


def _start(
    engine: Engine,
    deployment: dict[str, Any],
    image: str,
    env: dict[str, str],
    tmp: Path,
    run_id: str,
    probes: list[tuple[str, str]],
) -> Container:
    name = f"courier-test-{run_id}-{deployment['metadata']['name']}"
    env_file = tmp / f"{name}.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    env_file.chmod(0o600)
    argv, _ = docker_run_argv(deployment, image, env_file, name)
    spec = deployment["spec"]["template"]["spec"]
    container = Container(
        name=deployment["metadata"]["name"],
        argv=argv,
        grace_seconds=float(spec.get("terminationGracePeriodSeconds", 30)),
        probes=probes,
    )
    container.id = engine.run(*argv).stdout.strip()
    return container


def _logs(engine: Engine, container: Container) -> str:
    out = engine.run("logs", "--tail", "40", container.id, check=False)
    return (out.stdout + out.stderr)[-5000:]


def _wait_for_probes(engine: Engine, container: Container, budget: float) -> None:
    deadline = time.monotonic() + budget
    pending = dict(container.probes)
    last: dict[str, str] = {}
    with httpx.Client(timeout=3) as client:
        while pending:
            state = engine.run("inspect", "--format", "{{.State.Status}}", container.id)
            if state.stdout.strip() != "running":
                pytest.fail(
                    f"{container.name} stopped before its probes answered:\n"
                    f"{_logs(engine, container)}",
                    pytrace=False,
                )
            for what, url in list(pending.items()):
                try:
                    response = client.get(url)
                except httpx.HTTPError as exc:
                    last[what] = repr(exc)
                    continue
                last[what] = f"{response.status_code} {response.text[:200]}"
                if response.status_code == 200:
                    del pending[what]
            if pending and time.monotonic() > deadline:
                pytest.fail(
                    f"{container.name}: {sorted(pending)} did not answer 200 within {budget}s: "
                    f"{last}\n{_logs(engine, container)}",
                    pytrace=False,
                )
            time.sleep(0.3)


def _url(stack: dict[str, Container], service: str) -> str:
    (url,) = [u for what, u in stack[service].probes if what == "metrics"]
    return url.removesuffix("/metrics")


def _sink_control(stack: dict[str, Container]) -> str:
    (url,) = [u for _, u in stack[f"{RELEASE}-smtp-sink"].probes]
    return url.removesuffix("/_sink/healthz")


@pytest.mark.parametrize("service", sorted(CHART_KEYS))
def test_probes_and_metrics_answer_in_the_container(
    stack: dict[str, Container], service: str
) -> None:
    container = stack[service]
    assert {"--read-only", "no-new-privileges", "--user"} <= set(container.argv)
    with httpx.Client(timeout=5) as client:
        for what, url in container.probes:
            response = client.get(url)
            assert response.status_code == 200, f"{what} {url}: {response.text}"
        metrics = client.get(f"{_url(stack, service)}/metrics").text
    assert re.search(r"^# TYPE courier_\w+", metrics, re.MULTILINE), metrics[:500]


def _register(stack: dict[str, Container], email: str) -> dict[str, Any]:
    response = httpx.post(
        f"{_url(stack, 'user-service')}/v1/users",
        json={"email": email, "display_name": "Image Test", "locale": "en"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def test_a_registration_reaches_the_smtp_sink_through_the_containers(
    stack: dict[str, Container],
) -> None:
    email = f"welcome-{secrets.token_hex(4)}@example.com"
    _register(stack, email)
    deadline = time.monotonic() + 60
    received: list[dict[str, Any]] = []
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            messages = client.get(f"{_sink_control(stack)}/_sink/messages").json()
            records = messages["items"] if isinstance(messages, dict) else messages
            received = [m for m in records if email in m.get("rcpt_tos", [])]
            if received:
                break
            time.sleep(0.3)
    assert received, f"no welcome for {email} reached the SMTP sink container"


def test_a_550_from_the_sink_reaches_the_archiver_container(stack: dict[str, Container]) -> None:
    control = _sink_control(stack)
    armed = httpx.post(f"{control}/_sink/fail", json={"count": 1, "code": 550}, timeout=5)
    assert armed.status_code == 200, armed.text
    user = _register(stack, f"refused-{secrets.token_hex(4)}@example.com")
    deadline = time.monotonic() + 60
    archived: list[dict[str, Any]] = []
    with httpx.Client(base_url=_url(stack, "dlq-archiver"), timeout=5) as archiver:
        while time.monotonic() < deadline and not archived:
            items = archiver.get("/v1/dead-letters").json()["items"]
            archived = [i for i in items if user["id"] in str(i)]
            time.sleep(0.3)
    assert archived, f"the 550 for user {user['id']} did not reach the archiver's API"
    assert "550" in str(archived[0]), archived[0]


def test_sigterm_ends_each_container_within_its_grace_period_with_exit_0(
    engine: Engine, stack: dict[str, Container]
) -> None:
    for container in stack.values():
        engine.run("kill", "--signal", "TERM", container.id)
    for container in stack.values():
        try:
            code = engine.run("wait", container.id, timeout=container.grace_seconds).stdout
        except Exception as exc:  # subprocess.TimeoutExpired
            pytest.fail(
                f"{container.name} did not stop within {container.grace_seconds:.0f}s of "
                f"SIGTERM ({exc!r}):\n{_logs(engine, container)}",
                pytrace=False,
            )
        assert code.strip() == "0", f"{container.name} exited {code}:\n{_logs(engine, container)}"
