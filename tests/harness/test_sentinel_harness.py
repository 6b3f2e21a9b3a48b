"""The private Sentinel group of courier_testing.sentinel: what it starts, and how it fails.

The group itself is exercised by every Sentinel test (libs/common/tests/test_redis.py, the
user-service replication tests, R1 and R2); here: it is private, and without redis-server
its fixture fails instead of skipping.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis

from courier_testing.sentinel import RedisSentinelGroup, redis_sentinel_group

pytestmark = pytest.mark.fault

_FIXTURES = (redis_sentinel_group,)


def test_the_group_is_private_and_stops_with_its_fixture(tmp_path: Path) -> None:
    with RedisSentinelGroup(tmp_path) as group:
        ports = [n.port for n in group.nodes] + [s.port for s in group.sentinels]
        assert 6379 not in ports
        assert 26379 not in ports
        assert len(set(ports)) == 5
        primary = group.primary()
        assert primary is group.first_primary
        assert group.replicas()[0].info()["master_link_status"] == "up"
        for sentinel in group.sentinels:
            state = sentinel.master()
            assert state["quorum"] == "2"
            assert state["num-other-sentinels"] == "2"
        pids = [server.pid for server in [*group.nodes, *group.sentinels]]
    assert all(pid is not None for pid in pids)
    for port in ports:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert redis.Redis(port=6379).ping(), "the shared Redis is untouched"


def test_the_fixture_fails_without_redis_server(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(
        "from courier_testing.sentinel import redis_sentinel_group  # noqa: F401\n"
    )
    (tmp_path / "test_it.py").write_text(
        textwrap.dedent(
            """
            def test_needs_it(redis_sentinel_group):
                pass
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
        cwd=tmp_path,
        env={
            **os.environ,
            "CI": "true",
            "COURIER_REDIS_SERVER": "no-such-redis-server",
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "1 error" in output, output
    assert "skipped" not in output, output
    assert "no-such-redis-server" in output, output
