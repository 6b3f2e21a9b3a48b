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
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from courier_testing.backing import BrokerAdmin, BrokerVhost
from tests.support.deploy import ROOT, of_kind, render_objects
from tests.support.kube import (
    PortMap,
    broker_user,
    container_port,
    expand,
    matches,
    resolve_env,
)

pytestmark = pytest.mark.slow

VENV_BIN = ROOT / ".venv" / "bin"
#: What a container gets besides its manifest env; the image sets PATH, the rest is hygiene.
BASE_ENV = {"LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}


# --- this machine ------------------------------------------------------------------------------


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
    """An AMQP URL for a user made for this test (not guest), on its vhost."""
    with broker_user(broker_admin, vhost) as url:
        yield url


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
            if not matches(selector, service["metadata"].get("labels", {})):
                continue
            if not matches(service["spec"].get("selector", {}), pod_labels):
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
        argv = [expand(a, env) for a in [*container["command"], *container.get("args", [])]]
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
