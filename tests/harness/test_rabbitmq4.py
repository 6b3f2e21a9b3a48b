"""The RabbitMQ 4 node in its chroot: really 4.0, on its own epmd, and nothing left behind.

Runs in ``make test`` (about 15 s once the root is cached): it is what keeps the chroot path
of the harness working between full fault-matrix runs.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import aio_pika
import pytest

from courier_testing.private_services import PrivateRabbitMQ, _all_procs
from courier_testing.rabbitmq4 import RabbitMQ4Root, debian_mirror, start_rabbitmq4_node

pytestmark = pytest.mark.fault


def mounts_under(path: Path) -> list[str]:
    return [line for line in Path("/proc/mounts").read_text().splitlines() if str(path) in line]


def host_epmd_names() -> str:
    done = subprocess.run(
        ["epmd", "-names"], capture_output=True, text=True, timeout=10, check=False
    )
    return done.stdout


def node_processes(node: PrivateRabbitMQ) -> list[int]:
    """Live processes that belong to *node* (RABBITMQ_NODENAME=<it> in their environment)."""
    marker = f"RABBITMQ_NODENAME={node.nodename}".encode()
    found = []
    for info in _all_procs():
        try:
            environ = Path(f"/proc/{info.pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ and info.state not in {"Z", "X"}:
            found.append(info.pid)
    return found


async def round_trip(url: str) -> bytes:
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            "courier-harness", durable=True, arguments={"x-queue-type": "quorum"}
        )
        await channel.default_exchange.publish(
            aio_pika.Message(b"four"), routing_key=queue.name, mandatory=True
        )
        message = await queue.get(timeout=10)
        await message.ack()
        await channel.queue_delete(queue.name, if_unused=False)
        return message.body


def test_the_mirror_is_the_one_apt_uses() -> None:
    sources = "".join(
        p.read_text()
        for p in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
        if p.is_file()
    )
    mirror = debian_mirror()
    assert mirror in sources
    assert mirror.endswith("/debian")


@pytest.mark.parametrize("ending", ["close", "sigkill"])
def test_a_rabbitmq4_node_runs_chrooted_and_leaves_nothing_behind(
    rabbitmq4_root: RabbitMQ4Root, tmp_path: Path, ending: str
) -> None:
    assert rabbitmq4_root.version.startswith("4.0")
    node, epmd = start_rabbitmq4_node(rabbitmq4_root, tmp_path)
    try:
        assert "RabbitMQ version: 4.0" in node.ctl("status")
        assert asyncio.run(round_trip(node.url)) == b"four"
        # Registered with its own epmd, never with the host's (the shared node's) on 4369.
        assert node.name not in host_epmd_names()
        assert epmd.port != 4369
        # The chroot's /proc, /dev and the bind-mounted work dir live in the node's own
        # mount namespace: the host sees none of them.
        assert mounts_under(rabbitmq4_root.path) == []
        assert node_processes(node)
        if ending == "sigkill":
            node.kill(flush=False)
    finally:
        node.close()
        epmd.close()
    assert node_processes(node) == []
    assert mounts_under(rabbitmq4_root.path) == []
    assert not epmd.running
