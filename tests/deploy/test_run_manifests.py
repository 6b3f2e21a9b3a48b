"""The rendered manifests run: every Deployment the chart renders with its DEFAULT values is
started on this machine the way the kubelet would start it, and every probe and scrape the
manifests point at answers.

For each Deployment: the container's ``command`` + ``args`` (a console script of the repo's
venv, as in the image), with exactly the environment Kubernetes would give it — the
ConfigMaps named by ``envFrom``, then ``env`` with ``valueFrom`` resolved against the rendered
ConfigMaps and an external Secret this test builds (Secret values replaced by local URLs and
tokens), ``$(VAR)`` references expanded. Only what cannot work on one machine is changed:

* ports: three pods each own their network namespace, one machine does not. A rendered
  port that is free here is used as is; a taken one (say ``make run`` holds 8000) is
  remapped to a free port, and every probe and scrape of it follows the same map;
* ``COURIER_REDIS_PREFIX``: the test's own prefix on the shared Redis;
* the Secret: ``amqp-url`` names a RabbitMQ user created for this test with a random password
  (the chart's ``COURIER_ENVIRONMENT=production`` refuses ``guest``), on the test's vhost.

SMTP, SMS and push stay whatever the ConfigMap says (``smtp.example.com`` …): nothing is sent
here, and no service's readiness depends on them (notification-service is ready when Redis
answers and it consumes; it dials SMTP and the providers only per message).

Then every ``startupProbe``, ``livenessProbe`` and ``readinessProbe`` ``httpGet`` and the
``endpoints[]`` of the ServiceMonitor that selects the Deployment's Service must answer 200
(with the probe's own ``timeoutSeconds``) within the startup budget the manifest grants
(``failureThreshold * periodSeconds``); ``/metrics`` must carry ``courier_`` families. Last,
SIGTERM: each process must exit 0 within the rendered ``terminationGracePeriodSeconds``.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import pytest

from tests.support.deploy import ROOT, of_kind, render_objects
from tests.support.fixtures import USER as BROKER_ADMIN_USER
from tests.support.fixtures import BrokerAdmin, BrokerVhost

pytestmark = pytest.mark.slow

VENV_BIN = ROOT / ".venv" / "bin"
#: What a container gets besides its manifest env; the image sets PATH, the rest is hygiene.
BASE_ENV = {"LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
TEST_USER_PREFIX = "courier-test-run-"
_VAR_REF = re.compile(r"\$\((\w+)\)|\$\$")


# --- Kubernetes semantics --------------------------------------------------------------------


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined names are replaced, ``$$`` is a literal ``$``,
    undefined references stay as written."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR_REF.sub(replace, value)


def _named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    found = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    return found[0] if found else None


def resolve_env(
    container: dict[str, Any],
    objects: list[dict[str, Any]],
    secrets_by_name: dict[str, dict[str, str]],
) -> dict[str, str]:
    """The container's environment as the kubelet builds it: ``envFrom`` in order (later
    sources win, optional ``prefix``), then ``env`` in order (overriding ``envFrom``), each
    ``value`` with ``$(VAR)`` expanded against what is defined before it."""

    def config_map(name: str) -> dict[str, str] | None:
        cm = _named(objects, "ConfigMap", name)
        return None if cm is None else {k: str(v) for k, v in (cm.get("data") or {}).items()}

    def lookup(kind: str, ref: dict[str, Any]) -> dict[str, str] | None:
        return config_map(ref["name"]) if kind == "ConfigMap" else secrets_by_name.get(ref["name"])

    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        kind, ref = (
            ("ConfigMap", source["configMapRef"])
            if "configMapRef" in source
            else ("Secret", source["secretRef"])
        )
        data = lookup(kind, ref)
        if data is None:
            assert ref.get("optional"), f"envFrom {kind} {ref['name']} does not exist"
            continue
        prefix = source.get("prefix", "")
        env.update({prefix + k: v for k, v in data.items()})
    for var in container.get("env", []):
        name = var["name"]
        if "value" in var:
            env[name] = _expand(str(var["value"]), env)
            continue
        if "valueFrom" not in var:
            env[name] = ""
            continue
        value_from = var["valueFrom"]
        for key, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
            if key in value_from:
                ref = value_from[key]
                data = lookup(kind, ref)
                if data is None or ref["key"] not in data:
                    # The kubelet refuses to start the container (CreateContainerConfigError).
                    assert ref.get("optional"), (
                        f"env {name}: {kind} {ref['name']} has no key {ref['key']!r}"
                    )
                    break
                env[name] = data[ref["key"]]
                break
        else:
            pytest.fail(f"env {name}: unsupported valueFrom {value_from}")
    return env


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's ``port``/``targetPort``: a number, or a container port name."""
    if isinstance(port, int):
        return port
    if port.isdigit():
        return int(port)
    (number,) = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    return int(number)


# --- this machine ------------------------------------------------------------------------------


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        port: int = sock.getsockname()[1]
        return port


class PortMap:
    """Rendered port → the port used here: the same one when free, else a free one."""

    def __init__(self) -> None:
        self.ports: dict[int, int] = {}

    def __call__(self, rendered: int) -> int:
        if rendered not in self.ports:
            taken = set(self.ports.values())
            port = rendered if _port_is_free(rendered) and rendered not in taken else 0
            while port == 0 or port in taken:
                port = _free_port()
            self.ports[rendered] = port
        return self.ports[rendered]

    def remapped(self) -> dict[int, int]:
        return {k: v for k, v in self.ports.items() if k != v}


@dataclass
class Check:
    """One HTTP GET a manifest promises will answer: a probe or a scrape."""

    what: str
    port: int
    path: str
    timeout: float
    status: int | None = None
    body: str = ""
    error: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"


@dataclass
class Pod:
    """One rendered Deployment, run as a local process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    grace_seconds: float
    startup_budget: float
    log_path: Path
    checks: list[Check] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, cwd: Path) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def logs(self, tail: int = 6000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-tail:]

    def describe(self) -> str:
        return f"{self.name} ({' '.join(self.argv)})"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


# --- the test's Secret: a real (non-guest) broker user on the test vhost ---------------------


@pytest.fixture
def broker_url(broker_admin: BrokerAdmin, vhost: BrokerVhost) -> Iterator[str]:
    """An AMQP URL for a user made for this test, with a random password, on its vhost.

    Tagged ``monitoring`` so the management API (which the services derive from the AMQP URL
    for queue-depth gauges) answers it."""
    client = broker_admin.client
    for user in client.get("/api/users").json():  # left by a crashed run
        name = user["name"]
        if name.startswith(TEST_USER_PREFIX):
            pid = name[len(TEST_USER_PREFIX) :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                client.delete(f"/api/users/{quote(name, safe='')}")
    user = f"{TEST_USER_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    password = secrets.token_urlsafe(24)
    client.put(
        f"/api/users/{quote(user, safe='')}", json={"password": password, "tags": "monitoring"}
    ).raise_for_status()
    try:
        client.put(
            f"/api/permissions/{quote(vhost.name, safe='')}/{quote(user, safe='')}",
            json={"configure": ".*", "write": ".*", "read": ".*"},
        ).raise_for_status()
        parts = urlsplit(vhost.amqp_url)
        assert parts.username == BROKER_ADMIN_USER
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.hostname}:{parts.port}"
        yield urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    finally:
        response = client.delete(f"/api/users/{quote(user, safe='')}")
        assert response.status_code in (204, 404), response.text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- building the pods from the manifests ----------------------------------------------------


def _http_probe(container: dict[str, Any], kind: str, ports: PortMap) -> Check | None:
    probe = container.get(kind)
    if probe is None or "httpGet" not in probe:
        return None
    get = probe["httpGet"]
    assert get.get("scheme", "HTTP") == "HTTP", f"{kind} uses {get['scheme']}"
    return Check(
        what=kind,
        port=ports(container_port(container, get["port"])),
        path=get.get("path", "/"),
        timeout=float(probe.get("timeoutSeconds", 1)),
    )


def _scrapes(
    deployment: dict[str, Any],
    container: dict[str, Any],
    objects: list[dict[str, Any]],
    ports: PortMap,
) -> list[Check]:
    """The ServiceMonitor endpoints that reach this Deployment: ServiceMonitor → Service (by
    label selector, same namespace) → Service port by name → targetPort → container port."""
    namespace = deployment["metadata"].get("namespace")
    pod_labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    checks: list[Check] = []
    for monitor in of_kind(objects, "ServiceMonitor"):
        selector = monitor["spec"]["selector"].get("matchLabels", {})
        for service in of_kind(objects, "Service"):
            if service["metadata"].get("namespace") != namespace:
                continue
            if not _matches(selector, service["metadata"].get("labels", {})):
                continue
            if not _matches(service["spec"].get("selector", {}), pod_labels):
                continue
            for endpoint in monitor["spec"]["endpoints"]:
                (service_port,) = [
                    p for p in service["spec"]["ports"] if p.get("name") == endpoint["port"]
                ]
                target = service_port.get("targetPort", service_port["port"])
                checks.append(
                    Check(
                        what=f"ServiceMonitor/{monitor['metadata']['name']}",
                        port=ports(container_port(container, target)),
                        path=endpoint.get("path", "/metrics"),
                        timeout=10.0,
                    )
                )
    return checks


def build_pods(
    objects: list[dict[str, Any]],
    secrets_by_name: dict[str, dict[str, str]],
    redis_prefix: str,
    ports: PortMap,
    log_dir: Path,
) -> list[Pod]:
    pods: list[Pod] = []
    for deployment in of_kind(objects, "Deployment"):
        name = deployment["metadata"]["name"]
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        assert not spec.get("initContainers"), f"{name}: init containers are not run here"
        env = resolve_env(container, objects, secrets_by_name)
        argv = [_expand(a, env) for a in [*container["command"], *container.get("args", [])]]
        script = VENV_BIN / argv[0]
        assert script.is_file(), f"{name}: command {argv[0]!r} is not a console script in .venv"
        argv[0] = str(script)

        # The process listens on COURIER_HTTP_PORT; the probes go to the container port.
        # They must be the same rendered port, or the kubelet would probe nothing.
        (http,) = container["ports"]
        assert env["COURIER_HTTP_PORT"] == str(http["containerPort"]), name
        env["COURIER_HTTP_PORT"] = str(ports(int(http["containerPort"])))
        env["COURIER_REDIS_PREFIX"] = redis_prefix

        startup = container["startupProbe"]
        pod = Pod(
            name=name,
            argv=argv,
            env={
                **BASE_ENV,
                **env,
                "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
                "HOME": str(log_dir),
            },
            grace_seconds=float(spec.get("terminationGracePeriodSeconds", 30)),
            startup_budget=float(startup.get("failureThreshold", 3))
            * float(startup.get("periodSeconds", 10)),
            log_path=log_dir / f"{name}.log",
        )
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            check = _http_probe(container, kind, ports)
            assert check is not None, f"{name} has no httpGet {kind}"
            pod.checks.append(check)
        pod.checks.extend(_scrapes(deployment, container, objects, ports))
        pods.append(pod)
    return pods


def _wait_until_every_check_answers(pod: Pod) -> None:
    deadline = time.monotonic() + pod.startup_budget
    pending = list(pod.checks)
    with httpx.Client() as client:
        while pending:
            assert pod.proc is not None
            if pod.proc.poll() is not None:
                pytest.fail(
                    f"{pod.describe()} exited with {pod.proc.returncode} before every probe "
                    f"answered:\n{pod.logs()}",
                    pytrace=False,
                )
            for check in list(pending):
                try:
                    response = client.get(check.url, timeout=check.timeout)
                except httpx.HTTPError as exc:
                    check.error = repr(exc)
                    continue
                check.status, check.body = response.status_code, response.text
                if response.status_code == 200:
                    pending.remove(check)
            if not pending:
                return
            if time.monotonic() > deadline:
                unanswered = "\n".join(
                    f"  {c.what} GET {c.url}: {c.status} {c.body[:300] or c.error}" for c in pending
                )
                pytest.fail(
                    f"{pod.describe()}: not every probe answered 200 within the startup budget "
                    f"({pod.startup_budget:.0f}s):\n{unanswered}\n--- log ---\n{pod.logs()}",
                    pytrace=False,
                )
            time.sleep(0.2)


def test_every_rendered_deployment_runs_and_answers_its_probes_and_scrapes(
    broker_url: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    objects = render_objects("default")
    secret_names = {
        ref["name"]
        for d in of_kind(objects, "Deployment")
        for c in d["spec"]["template"]["spec"]["containers"]
        for var in c.get("env", [])
        if (ref := var.get("valueFrom", {}).get("secretKeyRef"))
    }
    assert secret_names == {"courier-secrets"}, secret_names
    # Production values reference an EXISTING Secret; the chart must not render it.
    assert not [s for s in of_kind(objects, "Secret") if s["metadata"]["name"] in secret_names]
    external_secret = {
        "amqp-url": broker_url,
        "redis-url": redis_url,
        "admin-token": secrets.token_urlsafe(24),
        "sms-token": "sk_live_" + secrets.token_hex(16),
        "push-token": "pk_live_" + secrets.token_hex(16),
    }
    ports = PortMap()
    pods = build_pods(objects, {"courier-secrets": external_secret}, redis_prefix, ports, tmp_path)
    assert {p.name for p in pods} == {
        "courier-user-service",
        "courier-notification-service",
        "courier-dlq-archiver",
    }
    for pod in pods:
        # Kubernetes' precedence: env (the Secret) over envFrom; the ConfigMap's production.
        assert pod.env["COURIER_ENVIRONMENT"] == "production", pod.name
        assert pod.env["COURIER_AMQP_URL"] == broker_url, pod.name
        assert any(c.what.startswith("ServiceMonitor/") for c in pod.checks), pod.name

    run_dir = tmp_path / "cwd"  # like the image's /app: no repository files to lean on
    run_dir.mkdir()
    timings: dict[str, float] = {}
    try:
        started = time.monotonic()
        for pod in pods:  # all at once, like a fresh install
            pod.start(run_dir)
        for pod in pods:
            _wait_until_every_check_answers(pod)
            timings[pod.name] = time.monotonic() - started
            metrics = next(c for c in pod.checks if c.what.startswith("ServiceMonitor/"))
            families = set(re.findall(r"^# TYPE (courier_\w+)", metrics.body, re.MULTILINE))
            assert families, f"{pod.name}: /metrics has no courier_ families:\n{metrics.body}"

        for pod in pods:
            assert pod.proc is not None
            pod.proc.send_signal(signal.SIGTERM)
        for pod in pods:
            assert pod.proc is not None
            try:
                code = pod.proc.wait(pod.grace_seconds)
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"{pod.describe()} did not exit within terminationGracePeriodSeconds "
                    f"({pod.grace_seconds:.0f}s) of SIGTERM:\n{pod.logs()}",
                    pytrace=False,
                )
            assert code == 0, f"{pod.describe()} exited {code} on SIGTERM:\n{pod.logs()}"
    finally:
        for pod in pods:
            pod.kill()
    print(f"ready after (s): {timings}; ports remapped: {ports.remapped() or 'none'}")
