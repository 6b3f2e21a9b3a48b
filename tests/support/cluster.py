"""A private three-node RabbitMQ cluster on loopback, and the fault stack on it.

Three `PrivateRabbitMQ` nodes (each with its own node name, ports, data dir and management
plugin) share one Erlang cookie and one private epmd (its own ``ERL_EPMD_PORT``, so nothing
here registers with the host's epmd on 4369 or talks to the shared ``rabbit@localhost``); the
second and third join the first with ``rabbitmqctl join_cluster``. The services get every
node's URL in ``COURIER_AMQP_URL`` and every node's management API in
``COURIER_AMQP_MANAGEMENT_URL``, as a deployment on a cluster would.

Fixtures: ``rabbit_cluster`` (started, closed after the test, nodes always stopped in
teardown) and ``cluster_stack`` (a `FaultStack` whose broker is the cluster). A missing
RabbitMQ fails, never skips (as ``private_rabbitmq``).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from courier_sinks.http import HttpSink
from courier_sinks.smtp import SmtpSink
from courier_testing.private_services import (
    Lifecycle,
    PrivateEpmd,
    PrivateRabbitMQ,
    PrivateRedis,
    PrivateServiceError,
    _missing_rabbitmq,
)
from tests.support.chain import start_chain
from tests.support.faults import FaultStack
from tests.support.processes import ServiceRunner

__all__ = ["RabbitCluster", "cluster_stack", "rabbit_cluster"]


class RabbitCluster(Lifecycle):
    """*size* private nodes joined into one cluster (``close()`` stops every one of them)."""

    def __init__(self, base_dir: Path, *, size: int = 3) -> None:
        token = secrets.token_hex(3)
        self.epmd = PrivateEpmd(base_dir)
        cookie = secrets.token_hex(16)
        self.nodes: list[PrivateRabbitMQ] = [
            PrivateRabbitMQ(
                base_dir,
                name=f"courier-c{n}-{token}",
                management=True,
                epmd=self.epmd,
                cookie=cookie,
            )
            for n in range(1, size + 1)
        ]
        self.formed_seconds: float | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Boot every node at once (most of a boot is waiting), then join them one by one."""
        started = time.monotonic()
        first, *others = self.nodes
        self.epmd.start()
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            for future in [pool.submit(node.start, 120) for node in self.nodes]:
                future.result()
        for node in others:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.nodename)
            node.ctl("start_app")
        self.wait_running(len(self.nodes))
        self.formed_seconds = time.monotonic() - started

    def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.close()
        self.epmd.close()

    # --- addresses ------------------------------------------------------------------------------

    @property
    def amqp_url(self) -> str:
        """Every node's URL, comma-separated: what ``COURIER_AMQP_URL`` gets."""
        return ",".join(node.url for node in self.nodes)

    @property
    def management_url(self) -> str:
        """Every node's management API with credentials, comma-separated."""
        return ",".join(
            f"http://guest:guest@127.0.0.1:{node.management_port}" for node in self.nodes
        )

    @property
    def running(self) -> list[PrivateRabbitMQ]:
        return [node for node in self.nodes if node.running]

    def node(self, nodename: str) -> PrivateRabbitMQ:
        for node in self.nodes:
            if node.nodename == nodename:
                return node
        raise KeyError(f"no node {nodename!r} in this cluster")

    # --- state, from whichever node answers ------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        """GET from the management API of the first running node that answers."""
        error: Exception | None = None
        for node in self.running:
            try:
                response = httpx.get(
                    f"{node.management_url}{path}",
                    params=params or None,
                    auth=("guest", "guest"),
                    timeout=10,
                )
                response.raise_for_status()
                return response.json()
            except httpx.HTTPError as exc:
                error = exc
        raise PrivateServiceError(f"no node answered {path}: {error!r}")

    def queue(self, name: str, vhost: str = "/") -> dict[str, Any]:
        """``name``, ``leader`` and ``members`` of a quorum queue, as the nodes know them now.

        From ``rabbitmqctl list_queues`` on a running node, not the management API, whose
        statistics lag by seconds (and show no leader for a queue just declared).
        """
        error: Exception | None = None
        for node in self.running:
            try:
                out = node.ctl(
                    "list_queues", "-p", vhost, "name", "leader", "members", "--formatter", "json"
                )
            except PrivateServiceError as exc:
                error = exc
                continue
            for row in json.loads(out):
                if row.get("name") == name:
                    info: dict[str, Any] = row
                    return info
            raise PrivateServiceError(f"no queue {name!r} in vhost {vhost!r}")
        raise PrivateServiceError(f"no node could list the queues: {error!r}")

    def leader(self, queue: str, vhost: str = "/") -> PrivateRabbitMQ:
        """The node that leads quorum queue *queue* now."""
        return self.node(str(self.queue(queue, vhost)["leader"]))

    def members(self, queue: str, vhost: str = "/") -> list[str]:
        return [str(m) for m in self.queue(queue, vhost).get("members") or []]

    def wait_running(self, count: int, timeout: float = 120) -> None:
        """Until the cluster reports *count* running nodes."""
        deadline = time.monotonic() + timeout
        running: list[str] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(PrivateServiceError):
                running = [n["name"] for n in self.api("/api/nodes") if n.get("running")]
                if len(running) >= count:
                    return
            time.sleep(0.5)
        raise PrivateServiceError(f"only {running} running after {timeout} s")

    def wait_quorum_plus_one(self, node: PrivateRabbitMQ, timeout: float = 180) -> None:
        """Until *node* can stop without any quorum queue losing its majority.

        ``rabbitmq-upgrade await_online_quorum_plus_one``: what the cluster operator runs
        before it lets a StatefulSet pod go.
        """
        node._run_cli(
            "rabbitmq-upgrade",
            "await_online_quorum_plus_one",
            "-t",
            str(int(timeout)),
            timeout=timeout + 30,
        )


def cluster_queue_depths(cluster: RabbitCluster, vhost: str = "/") -> dict[str, int]:
    return {
        q["name"]: int(q.get("messages", 0))
        for q in cluster.api(f"/api/queues/{quote(vhost, safe='')}")
    }


@pytest.fixture
def rabbit_cluster(tmp_path: Path) -> Iterator[RabbitCluster]:
    """A started three-node cluster (management on every node); stopped after the test."""
    missing = _missing_rabbitmq()
    if missing:
        pytest.fail(
            "rabbit_cluster: cannot run private RabbitMQ nodes, missing: " + ", ".join(missing),
            pytrace=False,
        )
    cluster = RabbitCluster(tmp_path / "cluster")
    try:
        try:
            cluster.start()
        except PrivateServiceError as exc:
            pytest.fail(f"rabbit_cluster: could not form: {exc}", pytrace=False)
        print(f"cluster of {len(cluster.nodes)} formed in {cluster.formed_seconds:.1f} s")
        yield cluster
    finally:
        cluster.close()


class ClusterFaultStack(FaultStack):
    """The fault stack on a cluster: queue depths from whichever node answers."""

    cluster: RabbitCluster

    def queue_depths(self) -> dict[str, int]:
        return cluster_queue_depths(self.cluster)


@pytest.fixture
def cluster_stack(
    fault_env: dict[str, dict[str, str]],
    rabbit_cluster: RabbitCluster,
    private_redis: PrivateRedis,
    services: ServiceRunner,
    smtp_sink: SmtpSink,
    http_sink: HttpSink,
) -> Iterator[ClusterFaultStack]:
    chain = start_chain(
        services,
        amqp_url=rabbit_cluster.amqp_url,
        redis_url=private_redis.url,
        redis_prefix="courier:",
        smtp_sink=smtp_sink,
        http_sink=http_sink,
        management_url=rabbit_cluster.management_url,
        extra_env={"COURIER_AMQP_HEARTBEAT_SECONDS": "5"},
        service_env=fault_env,
    )
    with httpx.Client(base_url=chain.url("user-service"), timeout=30) as users:
        stack = ClusterFaultStack(
            broker=rabbit_cluster.nodes[0],
            redis=private_redis,
            chain=chain,
            smtp=smtp_sink,
            http=http_sink,
            users=users,
        )
        stack.cluster = rabbit_cluster
        yield stack
