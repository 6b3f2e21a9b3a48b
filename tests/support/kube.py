"""Kubernetes semantics the run tests need, and the test's own broker user.

``resolve_env`` builds a container's environment as the kubelet does (``envFrom``, ``env``,
``valueFrom``, ``$(VAR)``); ``container_port`` resolves a named port; ``PortMap`` maps each
rendered port to one free on this machine; ``broker_user`` creates a non-guest RabbitMQ
user on a test vhost (production settings refuse ``guest``) and removes it afterwards.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

from courier_testing.backing import USER as BROKER_ADMIN_USER
from courier_testing.backing import BrokerAdmin, BrokerVhost, alive
from tests.support.deploy import of_kind

TEST_USER_PREFIX = "courier-test-run-"
_VAR_REF = re.compile(r"\$\((\w+)\)|\$\$")


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined names are replaced, ``$$`` is a literal ``$``,
    undefined references stay as written."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR_REF.sub(replace, value)


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
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
        cm = named(objects, "ConfigMap", name)
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
            env[name] = expand(str(var["value"]), env)
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


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def free_port() -> int:
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
            port = rendered if port_is_free(rendered) and rendered not in taken else 0
            while port == 0 or port in taken:
                port = free_port()
            self.ports[rendered] = port
        return self.ports[rendered]

    def remapped(self) -> dict[int, int]:
        return {k: v for k, v in self.ports.items() if k != v}


@contextmanager
def broker_user(broker_admin: BrokerAdmin, vhost: BrokerVhost) -> Iterator[str]:
    """An AMQP URL for a user made for this test, with a random password, on its vhost.

    Tagged ``monitoring`` so the management API (which the services derive from the AMQP URL
    for queue-depth gauges) answers it."""
    client = broker_admin.client
    for user in client.get("/api/users").json():  # left by a crashed run
        name = user["name"]
        if name.startswith(TEST_USER_PREFIX):
            pid = name[len(TEST_USER_PREFIX) :].split("-", 1)[0]
            if pid.isdigit() and not alive(int(pid)):
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
