"""Worker processes that die, or are told to stop, in the middle of handling a message."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio
from aio_pika.abc import AbstractRobustChannel

from courier_common.messaging import Publisher, new_event
from courier_common.messaging.topology import DeclaredTopology
from tests.support.fixtures import BrokerAdmin, BrokerVhost
from tests.support.helpers import eventually, get_all, ready_count
from tests.support.messaging import Pinged

REPO = Path(__file__).resolve().parents[3]
Spawn = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def spawn_worker(
    amqp_url: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> Iterator[Spawn]:
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(**env: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"worker-{len(procs)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.worker"],
            cwd=REPO,
            env={
                **os.environ,
                "COURIER_AMQP_URL": amqp_url,
                "COURIER_REDIS_URL": redis_url,
                "WORKER_KEYS": redis_prefix,
                **env,
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def worker_log(tmp_path: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(tmp_path.glob("worker-*.log")))


async def wait_ready(client: redis.asyncio.Redis, prefix: str, count: int) -> None:
    async def ready() -> bool:
        return int(await client.get(prefix + "ready") or 0) >= count

    await eventually(ready, timeout=30, what=f"{count} worker(s) subscribed")


async def list_of(client: redis.asyncio.Redis, key: str) -> list[str]:
    values = await client.lrange(key, 0, -1)
    return [v.decode() if isinstance(v, bytes) else v for v in values]


async def settled(admin: BrokerAdmin, vhost: BrokerVhost) -> None:
    def empty() -> bool:
        return all(
            (q.get("messages_ready", 0), q.get("messages_unacknowledged", 0)) == (0, 0)
            for q in admin.queues(vhost.name)
            if q["name"] != "courier.dead-letters"
        )

    await eventually(empty, timeout=30, interval=0.3, what="every work queue to be empty")


async def test_worker_killed_mid_handler_redelivers_and_the_effect_happens_once(
    declared: DeclaredTopology,
    channel: AbstractRobustChannel,
    spawn_worker: Spawn,
    redis_client: redis.asyncio.Redis,
    redis_prefix: str,
    broker_admin: BrokerAdmin,
    vhost: BrokerVhost,
) -> None:
    first = spawn_worker(WORKER_SLEEP="30", WORKER_IDEMPOTENT="1", WORKER_LEASE="1")
    await wait_ready(redis_client, redis_prefix, 1)
    event = new_event(Pinged(n=1), source="t")
    await Publisher(channel).publish_event(event)

    async def started() -> bool:
        return bool(await list_of(redis_client, redis_prefix + "started"))

    await eventually(started, what="the handler to start")
    first.send_signal(signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL

    spawn_worker(WORKER_IDEMPOTENT="1", WORKER_LEASE="1")

    async def affected() -> bool:
        return bool(await list_of(redis_client, redis_prefix + "effects"))

    await eventually(affected, timeout=30, what="the effect")
    await settled(broker_admin, vhost)
    await asyncio.sleep(1)  # a second effect would have shown up by now
    assert await list_of(redis_client, redis_prefix + "effects") == [str(event.id)]
    assert len(await list_of(redis_client, redis_prefix + "started")) >= 2
    assert await ready_count(channel, "courier.dead-letters") == 0


async def test_handler_that_kills_its_process_is_dead_lettered_by_the_delivery_limit(
    declared: DeclaredTopology,
    channel: AbstractRobustChannel,
    spawn_worker: Spawn,
    redis_client: redis.asyncio.Redis,
    redis_prefix: str,
    broker_admin: BrokerAdmin,
    vhost: BrokerVhost,
    tmp_path: Path,
) -> None:
    event = new_event(Pinged(n=66, note="poison"), source="t")
    await Publisher(channel).publish_event(event)
    deaths = 0
    for _ in range(10):  # the limit is 3: a bounded number of crashes, never a loop
        if await ready_count(channel, "courier.dead-letters"):
            break
        proc = spawn_worker(WORKER_BEHAVIOR="suicide")
        try:
            rc = await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = await asyncio.to_thread(proc.wait, 10)
            if await ready_count(channel, "courier-test.work") == 0:
                break
        assert rc == -signal.SIGKILL, worker_log(tmp_path)
        deaths += 1
        await asyncio.sleep(0.3)

    [dead] = await get_all(channel, "courier.dead-letters", expect=1, timeout=20)
    assert dead.message_id == str(event.id)
    assert dead.headers["x-first-death-reason"] == "delivery_limit"
    assert dead.headers["x-first-death-queue"] == "courier-test.work"
    assert 3 <= deaths <= 5
    assert len(await list_of(redis_client, redis_prefix + "started")) == deaths


async def test_sigterm_lets_in_flight_messages_finish_and_exits_zero(
    declared: DeclaredTopology,
    channel: AbstractRobustChannel,
    spawn_worker: Spawn,
    redis_client: redis.asyncio.Redis,
    redis_prefix: str,
    broker_admin: BrokerAdmin,
    vhost: BrokerVhost,
    tmp_path: Path,
) -> None:
    worker = spawn_worker(WORKER_SLEEP="1.5", WORKER_PREFETCH="5")
    await wait_ready(redis_client, redis_prefix, 1)
    events = [new_event(Pinged(n=i), source="t") for i in range(5)]
    publisher = Publisher(channel)
    for event in events:
        await publisher.publish_event(event)

    async def all_started() -> bool:
        return len(await list_of(redis_client, redis_prefix + "started")) == 5

    await eventually(all_started, what="5 messages in flight")
    worker.send_signal(signal.SIGTERM)
    rc = await asyncio.to_thread(worker.wait, 30)
    assert rc == 0, worker_log(tmp_path)
    assert sorted(await list_of(redis_client, redis_prefix + "effects")) == sorted(
        str(e.id) for e in events
    )
    await settled(broker_admin, vhost)
    assert "consumer_draining" in worker_log(tmp_path)
