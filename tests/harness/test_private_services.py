"""Tests for the private RabbitMQ / Redis servers used by the fault tests.

They really start, SIGKILL, SIGSTOP and restart servers, so they are slow (``fault``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import aio_pika
import httpx
import pytest
import redis

from courier_testing.private_services import (
    PrivateRabbitMQ,
    PrivateRedis,
    PrivateServiceError,
    private_rabbitmq,
    private_redis,
    sweep_orphans,
)

pytestmark = pytest.mark.fault

SHARED_AMQP_PORT = 5672
SHARED_REDIS_PORT = 6379

# The fixtures are used below by name; importing them is what makes them available here.
_FIXTURES = (private_rabbitmq, private_redis)


# --- helpers --------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in {"Z", "X"}


async def _publish_durable(url: str, queues: dict[str, str], body: bytes) -> None:
    """Declare durable queues (name -> x-queue-type), publish one persistent message to each."""
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        for name, queue_type in queues.items():
            await channel.declare_queue(name, durable=True, arguments={"x-queue-type": queue_type})
            confirmation = await channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=name,
                mandatory=True,
                timeout=10,
            )
            assert confirmation is not None


async def _get_one(url: str, name: str, queue_type: str) -> bytes | None:
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            name, durable=True, arguments={"x-queue-type": queue_type}
        )
        # A quorum queue may need a moment to elect its (single) leader after a restart.
        for _ in range(50):
            message = await queue.get(no_ack=False, fail=False, timeout=10)
            if message is not None:
                await message.ack()
                return message.body
            await asyncio.sleep(0.1)
        return None


async def _roundtrip(url: str) -> bytes | None:
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("", exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"ping"), routing_key=queue.name)
        message = await queue.get(fail=False, timeout=10)
        return None if message is None else message.body


# --- RabbitMQ -------------------------------------------------------------------------------

QUEUES = {"fault.quorum": "quorum", "fault.classic": "classic"}
# Courier only uses quorum queues. A confirmed persistent message in a classic (v1) queue was
# once (in ~30 runs, never again in 200 targeted attempts) missing after SIGKILL + restart,
# so classic queues are only checked across a graceful restart.
AFTER_SIGKILL = {"fault.quorum": "quorum"}


@pytest.mark.parametrize("graceful", [False, True], ids=["sigkill", "graceful"])
def test_rabbitmq_durable_messages_survive_restart(
    private_rabbitmq: PrivateRabbitMQ, graceful: bool
) -> None:
    node = private_rabbitmq
    body = f"survives-{graceful}".encode()
    asyncio.run(_publish_durable(node.url, QUEUES, body))
    beam_before = node.beam_pid()
    amqp_port = node.amqp_port

    if graceful:
        node.stop()
    else:
        node.kill()
    assert not _alive(beam_before)
    assert not node.running
    assert not node.is_responsive(timeout=0.5)
    node.start()

    assert node.amqp_port == amqp_port
    assert node.beam_pid() != beam_before
    for name, queue_type in (QUEUES if graceful else AFTER_SIGKILL).items():
        assert asyncio.run(_get_one(node.url, name, queue_type)) == body, name


def test_rabbitmq_restart_keeps_ports_and_data(private_rabbitmq: PrivateRabbitMQ) -> None:
    node = private_rabbitmq
    asyncio.run(_publish_durable(node.url, {"fault.restart": "quorum"}, b"again"))
    ports = (node.amqp_port, node.dist_port)
    node.restart()
    assert (node.amqp_port, node.dist_port) == ports
    node.restart(graceful=True)
    assert asyncio.run(_get_one(node.url, "fault.restart", "quorum")) == b"again"


def test_rabbitmq_is_private_and_shared_broker_untouched(
    private_rabbitmq: PrivateRabbitMQ,
) -> None:
    node = private_rabbitmq
    assert node.nodename.startswith("courier-fault-")
    assert node.nodename.endswith("@localhost")
    assert node.amqp_port != SHARED_AMQP_PORT
    assert node.management_port is None
    assert node.prometheus_port is None
    assert node.url == f"amqp://guest:guest@127.0.0.1:{node.amqp_port}/"

    status = node.ctl("status")
    assert node.nodename in status
    assert f"port: {node.amqp_port}" in status
    plugins = node.ctl("eval", "rabbit_plugins:active().")
    assert "rabbitmq_management" not in plugins

    assert asyncio.run(_roundtrip(node.url)) == b"ping"
    # the owner tag that sweep_orphans() relies on must be visible on the Erlang VM
    environ = Path(f"/proc/{node.beam_pid()}/environ").read_bytes()
    assert f"COURIER_PRIVATE_SERVICE_OWNER={os.getpid()}:".encode() in environ
    node.kill()
    shared_url = f"amqp://guest:guest@127.0.0.1:{SHARED_AMQP_PORT}/"
    assert asyncio.run(_roundtrip(shared_url)) == b"ping", "the shared broker must be unaffected"


def test_rabbitmq_pause_and_resume(private_rabbitmq: PrivateRabbitMQ) -> None:
    node = private_rabbitmq
    assert node.is_responsive()
    node.pause()
    try:
        assert not node.is_responsive(timeout=1.0)
        assert node.running
    finally:
        node.resume()
    assert node.is_responsive(timeout=5)
    assert asyncio.run(_roundtrip(node.url)) == b"ping"


def test_rabbitmq_kill_while_paused_then_start(private_rabbitmq: PrivateRabbitMQ) -> None:
    node = private_rabbitmq
    beam = node.beam_pid()
    node.pause()
    node.kill()
    assert not _alive(beam)
    node.start()
    assert asyncio.run(_roundtrip(node.url)) == b"ping"


def test_rabbitmq_management_and_prometheus(tmp_path: Path) -> None:
    with PrivateRabbitMQ(tmp_path, name="courier-fault-mgmt", management=True) as node:
        assert node.nodename == "courier-fault-mgmt@localhost"
        assert node.management_port is not None
        assert node.prometheus_port is not None
        assert 15672 not in (node.management_port, node.prometheus_port)
        overview = httpx.get(
            f"{node.management_url}/api/overview", auth=("guest", "guest"), timeout=10
        )
        assert overview.status_code == 200
        assert overview.json()["node"] == node.nodename
        metrics = httpx.get(f"http://127.0.0.1:{node.prometheus_port}/metrics", timeout=10)
        assert metrics.status_code == 200
        assert "rabbitmq_" in metrics.text


def test_rabbitmq_close_is_idempotent_and_leaves_nothing(tmp_path: Path) -> None:
    node = PrivateRabbitMQ(tmp_path)
    with node:
        beam = node.beam_pid()
        assert _alive(beam)
        sentinel = tmp_path / "caller-owned.txt"
        sentinel.write_text("mine")
    assert not _alive(beam)
    assert not node.running
    node.close()
    assert sentinel.read_text() == "mine"
    assert node.log_file.exists()
    with pytest.raises(PrivateServiceError, match="closed"):
        node.start()


def test_rabbitmq_rejects_bad_node_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="node name"):
        PrivateRabbitMQ(tmp_path, name="bad@name")


# --- Redis ----------------------------------------------------------------------------------


def test_redis_aof_survives_sigkill(private_redis: PrivateRedis) -> None:
    server = private_redis
    assert server.appendonly
    assert server.port != SHARED_REDIS_PORT
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    client = redis.Redis.from_url(server.url)
    try:
        client.set("fault:key", "value")
        pid = server.pid
        assert pid is not None
        server.kill()
        assert not _alive(pid)
        assert not server.is_responsive(timeout=0.5)
        with pytest.raises(redis.ConnectionError):
            client.get("fault:key")
        server.start()
        assert client.get("fault:key") == b"value"
        client.set("fault:key2", "value2")
        server.restart(graceful=True)
        assert client.mget("fault:key", "fault:key2") == [b"value", b"value2"]
    finally:
        client.close()
    assert redis.Redis(port=SHARED_REDIS_PORT).ping(), "the shared Redis must be unaffected"


def test_redis_without_aof_loses_data_on_kill(tmp_path: Path) -> None:
    with PrivateRedis(tmp_path, appendonly=False) as server:
        client = redis.Redis.from_url(server.url)
        try:
            client.set("k", "v")
            port = server.port
            server.restart()
            assert server.port == port
            assert client.get("k") is None
        finally:
            client.close()


def test_redis_pause_and_resume(private_redis: PrivateRedis) -> None:
    server = private_redis
    assert server.is_responsive()
    server.pause()
    try:
        assert not server.is_responsive(timeout=1.0)
        client = redis.Redis.from_url(server.url, socket_timeout=1.0)
        with pytest.raises(redis.TimeoutError):
            client.ping()
        client.close()
    finally:
        server.resume()
    assert server.is_responsive(timeout=5)


def test_redis_close_is_idempotent(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path, appendonly=True)
    with server:
        pid = server.pid
        assert pid is not None
    assert not _alive(pid)
    server.close()
    assert server.pid is None


# --- fixtures fail (never skip) without binaries ---------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "env", "expected"),
    [
        ("private_rabbitmq", {"COURIER_RABBITMQ_SBIN_DIR": "/nonexistent"}, "/nonexistent"),
        ("private_redis", {"COURIER_REDIS_SERVER": "no-such-redis-server"}, "no-such-redis"),
    ],
)
def test_fixture_fails_when_binaries_missing(
    tmp_path: Path, fixture: str, env: dict[str, str], expected: str
) -> None:
    (tmp_path / "conftest.py").write_text(
        "from courier_testing.private_services import private_rabbitmq, private_redis  # noqa\n"
    )
    (tmp_path / "test_it.py").write_text(
        textwrap.dedent(
            f"""
            def test_needs_it({fixture}):
                pass
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "CI": "true", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "1 error" in output, output
    assert "skipped" not in output, output
    assert expected in output, output


def test_orphans_of_a_dead_test_process_are_swept(tmp_path: Path) -> None:
    # Start ours first: the first start() of a process sweeps orphans by itself.
    with PrivateRedis(tmp_path) as mine:
        script = textwrap.dedent(
            f"""
            import os, pathlib
            from courier_testing.private_services import PrivateRedis
            server = PrivateRedis(pathlib.Path({str(tmp_path)!r}))
            server.start()
            print(server.pid, flush=True)
            os._exit(0)  # no cleanup at all: atexit handlers do not run
            """
        )
        done = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        orphan = int(done.stdout.strip())
        try:
            assert _alive(orphan)
            killed = sweep_orphans()
            # (a concurrently starting test process may have swept it a moment earlier)
            assert orphan in killed or not _alive(orphan)
            assert mine.pid not in killed
            assert mine.is_responsive(), "a live server of this process must survive"
            assert not _alive(orphan)
        finally:
            if _alive(orphan):
                os.kill(orphan, signal.SIGKILL)
