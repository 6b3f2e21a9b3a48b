"""A private Redis Sentinel group: a primary, a replica and three Sentinels on loopback ports.

What a production Redis with failover looks like, small enough for a test: two data nodes
(``appendonly yes``, ``appendfsync always``, as the README asks of production) and three
``redis-server --sentinel`` processes monitoring them as the master ``courier`` with quorum 2.
``down-after-milliseconds`` and ``failover-timeout`` are small, so a failover takes a few
seconds instead of half a minute. Each server has its own data directory and config file in
the test's temp dir; Sentinel rewrites its own file (and the data nodes' files, when it
reconfigures them) as it would in production. The shared Redis on 6379 is never touched.

Use the fixture (``redis_sentinel_group``) by importing it into a test module, or
`RedisSentinelGroup` directly (a context manager). Without ``redis-server`` the fixture FAILS,
never skips. The Courier stack on a group is ``sentinel_fault_stack`` in tests/support.

* `RedisSentinelGroup.kill_primary` SIGKILLs whichever node Sentinel calls the primary;
  `RedisSentinelGroup.wait_promoted` waits until every Sentinel names another one, and
  `RedisSentinelGroup.rejoin` starts the dead node again as a replica of the new primary.
* `RedisSentinelGroup.failover` is the planned ``SENTINEL FAILOVER``.
* `RedisSentinelGroup.wait_settled` waits until every Sentinel agrees on the primary, knows
  the other Sentinels and the replica, and the replica's link to the primary is up: before
  it, a kill might find Sentinels that cannot yet agree on a failover.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from courier_testing.private_services import (
    REDIS_SERVER,
    Lifecycle,
    PrivateRedis,
    PrivateServiceError,
    require,
    started,
)

__all__ = [
    "SERVICE",
    "RedisNode",
    "RedisSentinel",
    "RedisSentinelGroup",
    "redis_sentinel_group",
]

#: The master name the Sentinels monitor (COURIER_REDIS_SENTINEL_SERVICE).
SERVICE = "courier"


def _client(port: int, timeout: float = 2.0) -> redis.Redis:
    """A probe: one attempt (redis-py would otherwise retry a dead port for seconds)."""
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        decode_responses=True,
        retry=Retry(NoBackoff(), 0),
    )


class RedisNode(PrivateRedis):
    """A data node of the group, run from a ``redis.conf`` in its work dir.

    The file is written once, at the first start: Sentinel's ``CONFIG REWRITE`` (the
    ``replicaof`` line it sets when it turns a node into a replica) then survives a restart,
    as it would on a pod's config volume.
    """

    def __init__(self, base_dir: Path, *, replica_of: int | None = None) -> None:
        super().__init__(base_dir, appendonly=True, appendfsync="always")
        self.replica_of = replica_of
        #: Set by `RedisSentinelGroup.rejoin`: start as a replica of this port.
        self.start_as_replica_of: int | None = None
        self._label = f"Redis node :{self.port}"

    @property
    def config_file(self) -> Path:
        return self.workdir / "redis.conf"

    def _prepare(self) -> None:
        if self.config_file.exists():
            return
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f'dir "{self.workdir}"',
            "daemonize no",
            'logfile ""',
            'save ""',
            "appendonly yes",
            f"appendfsync {self.appendfsync}",
            # A replica's first sync starts at once (the default waits 5 s for more replicas).
            "repl-diskless-sync-delay 0",
            # Keep argv/environ intact: sweep_orphans() finds leftovers by their environment.
            "set-proc-title no",
        ]
        if self.replica_of is not None:
            lines.append(f"replicaof 127.0.0.1 {self.replica_of}")
        self.config_file.write_text("\n".join(lines) + "\n")

    def _command(self) -> list[str]:
        command = [shutil.which(REDIS_SERVER) or REDIS_SERVER, str(self.config_file)]
        if self.start_as_replica_of is not None:
            command += ["--replicaof", "127.0.0.1", str(self.start_as_replica_of)]
        return command

    def info(self, section: str = "replication") -> dict[str, str]:
        client = _client(self.port)
        try:
            raw: dict[str, object] = client.info(section)
        finally:
            client.close()
        return {key: str(value) for key, value in raw.items()}


class RedisSentinel(PrivateRedis):
    """One ``redis-server --sentinel`` watching the group's primary."""

    def __init__(
        self,
        base_dir: Path,
        *,
        primary_port: int,
        quorum: int,
        down_after_ms: int,
        failover_timeout_ms: int,
    ) -> None:
        super().__init__(base_dir, appendonly=False)
        self.primary_port = primary_port
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self._label = f"Redis Sentinel :{self.port}"

    @property
    def config_file(self) -> Path:
        return self.workdir / "sentinel.conf"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _prepare(self) -> None:
        if self.config_file.exists():
            return  # Sentinel rewrote it with what it learned (epoch, peers, replicas)
        self.config_file.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    "bind 127.0.0.1",
                    f'dir "{self.workdir}"',
                    "daemonize no",
                    'logfile ""',
                    "set-proc-title no",
                    f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary_port} {self.quorum}",
                    f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}",
                    f"sentinel failover-timeout {SERVICE} {self.failover_timeout_ms}",
                    f"sentinel parallel-syncs {SERVICE} 1",
                ]
            )
            + "\n"
        )

    def _command(self) -> list[str]:
        return [shutil.which(REDIS_SERVER) or REDIS_SERVER, str(self.config_file), "--sentinel"]

    def _wait_ready(self, deadline: float) -> None:
        while True:
            self._check_alive("starting")
            if self.is_responsive():
                return
            if time.monotonic() >= deadline:
                raise PrivateServiceError(
                    f"{self._label}: not ready in time\n" + self.diagnostics()
                )
            time.sleep(0.05)

    def master(self) -> dict[str, str]:
        """``SENTINEL MASTER courier`` as this Sentinel sees it."""
        client = _client(self.port)
        try:
            state = client.sentinel_master(SERVICE)
        finally:
            client.close()
        assert isinstance(state, dict), state
        return {str(key): str(value) for key, value in state.items()}

    def master_port(self) -> int | None:
        client = _client(self.port)
        try:
            address = client.sentinel_get_master_addr_by_name(SERVICE)
        except redis.RedisError:
            return None
        finally:
            client.close()
        return int(address[1]) if isinstance(address, tuple | list) else None


class RedisSentinelGroup(Lifecycle):
    """A primary, one replica and three Sentinels (quorum 2), private and on loopback."""

    def __init__(
        self,
        base_dir: Path,
        *,
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
    ) -> None:
        base = Path(base_dir).absolute()
        first = RedisNode(base / "data")
        self.nodes: list[RedisNode] = [first, RedisNode(base / "data", replica_of=first.port)]
        self.sentinels: list[RedisSentinel] = [
            RedisSentinel(
                base / "sentinel",
                primary_port=first.port,
                quorum=quorum,
                down_after_ms=down_after_ms,
                failover_timeout_ms=failover_timeout_ms,
            )
            for _ in range(sentinels)
        ]

    # --- what the services are given ------------------------------------------------------------

    @property
    def sentinel_addresses(self) -> str:
        """``COURIER_REDIS_SENTINELS``: every Sentinel as ``host:port``, comma-separated."""
        return ",".join(s.address for s in self.sentinels)

    @property
    def first_primary(self) -> RedisNode:
        """The node that was the primary when the group started."""
        return self.nodes[0]

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        for server in [*self.nodes, *self.sentinels]:
            server.start()
        self.wait_settled(timeout=timeout)

    def close(self) -> None:
        for server in [*self.sentinels, *self.nodes]:
            with contextlib.suppress(Exception):
                server.close()

    # --- what the Sentinels say -----------------------------------------------------------------

    def node(self, port: int) -> RedisNode:
        for node in self.nodes:
            if node.port == port:
                return node
        raise PrivateServiceError(f"no data node on port {port}")

    def master_ports(self) -> list[int | None]:
        """The primary's port according to each running Sentinel (None: it cannot say)."""
        return [s.master_port() for s in self.sentinels if s.running]

    def primary(self) -> RedisNode:
        """The node every Sentinel names as the primary (fails when they disagree)."""
        ports = set(self.master_ports())
        if len(ports) != 1 or None in ports:
            raise PrivateServiceError(f"the Sentinels disagree on the primary: {ports}")
        (port,) = ports
        assert port is not None
        return self.node(port)

    def replicas(self) -> list[RedisNode]:
        primary = self.primary()
        return [node for node in self.nodes if node is not primary]

    def _settled(self) -> str | None:
        """None when the group is ready for a fault; otherwise what is still missing."""
        ports = set(self.master_ports())
        if len(ports) != 1 or None in ports:
            return f"Sentinels name primaries {ports}"
        (port,) = ports
        assert port is not None
        primary = self.node(port)
        if not primary.running:
            return f"the primary :{port} is not running"
        for sentinel in self.sentinels:
            state = sentinel.master()
            flags = state.get("flags", "")
            if flags != "master":
                return f"Sentinel :{sentinel.port} sees the primary as {flags!r}"
            if int(state.get("num-other-sentinels", 0)) < len(self.sentinels) - 1:
                return f"Sentinel :{sentinel.port} does not know every other Sentinel yet"
            if int(state.get("num-slaves", 0)) < len(self.nodes) - 1:
                return f"Sentinel :{sentinel.port} does not know the replica yet"
        for node in self.nodes:
            if node is primary:
                continue
            if not node.running:
                return f"the replica :{node.port} is not running"
            info = node.info()
            if info.get("role") != "slave" or info.get("master_port") != str(port):
                return f":{node.port} is not yet a replica of :{port}"
            if info.get("master_link_status") != "up":
                return f"the replica :{node.port} has not synced yet"
        replicas = primary.info()
        if int(replicas.get("connected_slaves", 0)) < len(self.nodes) - 1:
            return f"the primary :{port} has no connected replica yet"
        return None

    def wait_settled(self, timeout: float = 60) -> RedisNode:
        """Until the group can take a failover: agreement, discovery, a synced replica."""
        deadline = time.monotonic() + timeout
        missing: str | None = "not checked"
        while time.monotonic() < deadline:
            try:
                missing = self._settled()
            except (redis.RedisError, OSError, PrivateServiceError) as exc:
                missing = repr(exc)
            if missing is None:
                return self.primary()
            time.sleep(0.1)
        raise PrivateServiceError(f"Sentinel group not settled after {timeout}s: {missing}")

    # --- faults ---------------------------------------------------------------------------------

    def kill_primary(self) -> RedisNode:
        """SIGKILL the node the Sentinels call the primary; returns it (to restart it later)."""
        primary = self.primary()
        primary.kill()
        return primary

    def rejoin(self, node: RedisNode) -> None:
        """Start a node that died as a replica of the primary the Sentinels name now.

        What a Redis StatefulSet's start script does (the Bitnami chart's, say): a pod that
        comes back asks the Sentinels who the primary is, instead of starting as the primary
        it was and waiting (up to ten seconds) for Sentinel to demote it.
        """
        node.start_as_replica_of = self.primary().port
        node.start()

    def failover(self) -> RedisNode:
        """``SENTINEL FAILOVER courier``: a planned switch; returns the primary it leaves."""
        primary = self.primary()
        client = _client(self.sentinels[0].port)
        try:
            assert client.sentinel_failover(SERVICE)
        finally:
            client.close()
        return primary

    def wait_promoted(self, old: RedisNode, timeout: float = 60) -> RedisNode:
        """Until every running Sentinel names a primary other than *old*, and it is one."""
        deadline = time.monotonic() + timeout
        ports: list[int | None] = []
        while time.monotonic() < deadline:
            ports = self.master_ports()
            if len(set(ports)) == 1 and ports[0] not in (None, old.port):
                assert ports[0] is not None
                new = self.node(ports[0])
                with contextlib.suppress(redis.RedisError, OSError):
                    if new.info().get("role") == "master":
                        return new
            time.sleep(0.05)
        raise PrivateServiceError(
            f"no Sentinel failover away from :{old.port} after {timeout}s (they say {ports})"
        )


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def redis_sentinel_group(tmp_path: Path) -> Iterator[RedisSentinelGroup]:
    """A settled primary + replica + three Sentinels; everything stopped after the test."""
    require(
        "redis_sentinel_group",
        "a private Redis",
        [] if shutil.which(REDIS_SERVER) else [f"{REDIS_SERVER} on PATH"],
        "install redis-server, or set COURIER_REDIS_SERVER",
    )
    with started("redis_sentinel_group", RedisSentinelGroup(tmp_path / "sentinel-group")) as group:
        yield group
