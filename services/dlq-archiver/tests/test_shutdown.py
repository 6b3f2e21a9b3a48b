"""The archiver stops promptly: a bulk replay is interrupted between two replays, nothing lost."""

from __future__ import annotations

import asyncio
import time

import aio_pika
import httpx
import redis.asyncio
from asgi_lifespan import LifespanManager

from courier_common.messaging import AmqpConnection
from dlq_archiver.config import Settings
from dlq_archiver.main import create_app
from dlq_archiver.shutdown import cancel_and_wait
from dlq_archiver.store import Archive, Filter
from tests.support.archiver import ADMIN, records, wait_records
from tests.support.helpers import eventually


async def test_a_task_that_loses_its_cancellation_still_stops() -> None:
    # What Python 3.11's asyncio.wait_for, and so every redis-py command, can do: swallow a
    # cancellation that arrives as the awaited call completes, and let the loop go on.
    async def loop_that_swallows_one_cancel() -> None:
        swallowed = False
        while True:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed = True
                task = asyncio.current_task()
                assert task is not None
                task.uncancel()

    task = asyncio.create_task(loop_that_swallows_one_cancel())
    await asyncio.sleep(0)
    started = time.monotonic()
    assert await cancel_and_wait([task], timeout=5)
    assert task.cancelled()
    assert time.monotonic() - started < 1


async def dead_letters(amqp_url: str, count: int) -> None:
    """``count`` dead letters of one kind, published as a consumer dead-letters them."""
    connection = await AmqpConnection(amqp_url, client_name="test").connect()
    try:
        channel = await connection.channel()
        dlx = await channel.get_exchange("courier.dlx")
        for n in range(count):
            await dlx.publish(
                aio_pika.Message(
                    b'{"n": %d}' % n,
                    message_id=f"dead-{n}",
                    content_type="application/json",
                    headers={
                        "x-courier-failure-reason": "SMTP 550: relay denied",
                        "x-courier-failure-kind": "permanent",
                        "x-courier-original-queue": "notification.user-events",
                        "x-courier-original-exchange": "courier.events",
                        "x-courier-original-routing-key": "user.registered",
                    },
                ),
                routing_key="user.registered",
            )
    finally:
        await connection.close()


async def test_shutdown_mid_job_interrupts_it_promptly_and_leaves_the_rest_untouched(
    archiver_settings: Settings,
    amqp_url: str,
    redis_client: redis.asyncio.Redis,
    redis_prefix: str,
) -> None:
    app = create_app(archiver_settings)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://archiver"
        ) as archiver:

            async def ready() -> bool:
                return (await archiver.get("/readyz")).status_code == 200

            await eventually(ready, timeout=30, what="the archiver to consume")
            await dead_letters(amqp_url, 5)
            dead = await wait_records(archiver, 5)
            job = await archiver.post(
                "/v1/dead-letters/replay",
                # one replay every 10 s: shutdown comes while the job waits for the second
                json={"fingerprint": dead[0]["fingerprint"], "canary": 0, "rate_per_second": 0.1},
                headers=ADMIN,
            )
            assert job.status_code == 202, job.text
            job_id = job.json()["id"]

            async def first_replayed() -> bool:
                return len(await records(archiver, status="replayed")) == 1

            await eventually(first_replayed, what="the first replay")
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 8  # not after the next paced replay, or later

    archive = Archive(redis_client, prefix=redis_prefix)
    job_state = await archive.get_job(job_id)
    assert job_state is not None
    assert job_state["status"] == "interrupted"
    assert job_state["replayed"] == 1
    stored = await archive.get_many(await archive.ids_matching(Filter()))
    assert sorted(r.status for r in stored) == ["dead"] * 4 + ["replayed"]  # the rest untouched
