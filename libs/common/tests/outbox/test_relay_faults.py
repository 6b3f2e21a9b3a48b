"""The relay under broker faults, on a private RabbitMQ node that the tests kill and pause."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from courier_common.messaging import EventData
from courier_common.outbox import GROUP, OutboxRelay
from courier_testing.events import DurableTap, Pinged, durable_tap
from courier_testing.polling import eventually
from courier_testing.private_services import PrivateRabbitMQ

pytestmark = pytest.mark.fault

Emit = Callable[[EventData], Awaitable[Any]]
StartRelay = Callable[..., Awaitable[OutboxRelay]]
SpawnRelay = Callable[..., subprocess.Popen[bytes]]
REPO = Path(__file__).resolve().parents[4]
RELAY_PROCESS = Path(__file__).with_name("relay_process.py")


@pytest.fixture
async def private_tap(private_rabbitmq: PrivateRabbitMQ) -> AsyncIterator[DurableTap]:
    async with durable_tap(private_rabbitmq.url, queue="outbox-test.tap", binding="test.*") as tap:
        yield tap


@pytest.fixture
def spawn_relay(redis_url: str, stream: str, tmp_path: Path) -> Iterator[SpawnRelay]:
    """Start ``relay_process.py`` as consumer *consumer*; SIGKILLed after the test."""
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(amqp_url: str, consumer: str, **env: str) -> subprocess.Popen[bytes]:
        with (tmp_path / f"relay-{consumer}.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, str(RELAY_PROCESS)],
                cwd=REPO,
                env={
                    **os.environ,
                    "COURIER_AMQP_URL": amqp_url,
                    "COURIER_REDIS_URL": redis_url,
                    "COURIER_ENVIRONMENT": "test",
                    "COURIER_AMQP_HEARTBEAT_SECONDS": "2",
                    "COURIER_OUTBOX_BLOCK_MS": "100",
                    "COURIER_OUTBOX_RETRY_MAX_SECONDS": "0.5",
                    "OTEL_TRACES_EXPORTER": "none",
                    "RELAY_STREAM": stream,
                    "RELAY_CONSUMER": consumer,
                    **env,
                },
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        kill(proc)


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


async def test_entries_written_while_the_broker_is_dead_go_out_once_it_is_back(
    private_rabbitmq: PrivateRabbitMQ,
    private_tap: DurableTap,
    emit: Emit,
    start_relay: StartRelay,
    redis_client: redis.asyncio.Redis,
    stream: str,
) -> None:
    await start_relay(private_rabbitmq.url)
    for n in range(20):
        await emit(Pinged(n=n))
    await private_tap.collect(20)

    async def idle() -> bool:
        return bool(await redis_client.xlen(stream) == 0)

    await eventually(idle, what="an idle outbox")
    await asyncio.to_thread(private_rabbitmq.kill)
    for n in range(20, 50):
        await emit(Pinged(n=n))
    await asyncio.sleep(1)  # a few relay rounds against the dead broker
    assert await redis_client.xlen(stream) == 30  # kept
    await asyncio.to_thread(private_rabbitmq.start)

    bodies = await private_tap.collect(50)
    await asyncio.sleep(2)  # a late duplicate would arrive now
    bodies = await private_tap.collect(50)
    sent = Counter(b["data"]["n"] for b in bodies)
    assert set(sent) == set(range(50))
    assert max(sent.values()) == 1  # none twice
    assert await redis_client.xlen(stream) == 0


async def test_a_relay_killed_mid_batch_loses_nothing(
    private_rabbitmq: PrivateRabbitMQ,
    private_tap: DurableTap,
    spawn_relay: SpawnRelay,
    emit: Emit,
    redis_client: redis.asyncio.Redis,
    stream: str,
) -> None:
    """Relay A reads a batch and is stuck on a hung broker when it is SIGKILLed; relay B
    claims what A held. A message A had sent may still land: a duplicate, same event id."""
    settings = {"COURIER_OUTBOX_BATCH_SIZE": "50", "COURIER_OUTBOX_CLAIM_IDLE_MS": "1000"}
    relay_a = spawn_relay(private_rabbitmq.url, "a", **settings)

    async def a_connected() -> bool:
        # A joins the group on its first read, after its broker connection and channels.
        assert relay_a.poll() is None, "relay A exited"
        if not await redis_client.exists(stream):
            return False
        consumers = await redis_client.xinfo_consumers(stream, GROUP)
        return any(c["name"] in ("a", b"a") for c in consumers)

    await eventually(a_connected, timeout=60, what="relay A connected to the broker")
    await asyncio.to_thread(private_rabbitmq.pause)
    try:
        for n in range(300):
            await emit(Pinged(n=n))

        async def a_holds_a_batch() -> bool:
            pending = await redis_client.xpending(stream, GROUP)
            return int(pending["pending"]) > 0

        await eventually(a_holds_a_batch, what="relay A to read a batch")
        kill(relay_a)
    finally:
        await asyncio.to_thread(private_rabbitmq.resume)
    spawn_relay(private_rabbitmq.url, "b", **settings)

    bodies = await private_tap.collect(300)
    await asyncio.sleep(2)  # a late duplicate would arrive now
    bodies = await private_tap.collect(300)
    assert {b["data"]["n"] for b in bodies} == set(range(300))
    ids: dict[int, set[str]] = {}
    for message, body in zip(private_tap.messages, bodies, strict=True):
        assert message.message_id == body["id"]
        ids.setdefault(body["data"]["n"], set()).add(body["id"])
    assert all(len(event_ids) == 1 for event_ids in ids.values())  # duplicates keep their id
    assert len(bodies) - len(ids) <= 50  # at most the batch A held
    assert await redis_client.xlen(stream) == 0
