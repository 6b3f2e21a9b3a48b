"""The archiver stops promptly and loses nothing: a bulk replay is interrupted between two
replays, and a dead letter it cannot store yet goes back to the queue."""

from __future__ import annotations

import time
from typing import Any

import aio_pika
import httpx
import redis.asyncio
import structlog
from asgi_lifespan import LifespanManager

from courier_common.messaging import DEAD_LETTER_QUEUE, AmqpConnection
from courier_testing.polling import eventually
from courier_testing.private_services import PrivateRedis
from dlq_archiver.config import Settings
from dlq_archiver.main import create_app
from dlq_archiver.store import Archive, Filter
from tests.support.archiver import ADMIN, records, wait_records

SOURCE_QUEUE = "courier-test.source"


async def dead_letters(amqp_url: str, count: int) -> None:
    """``count`` dead letters of one kind, published as a consumer dead-letters them."""
    connection = await AmqpConnection(amqp_url, client_name="test").connect()
    try:
        channel = await connection.channel()
        # The queue they died in, where a replay gives them back.
        await channel.declare_queue(SOURCE_QUEUE, durable=True)
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
                        "x-courier-original-queue": SOURCE_QUEUE,
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


async def test_stopping_while_redis_is_away_gives_the_dead_letter_back(
    archiver_settings: Settings, amqp_url: str, private_redis: PrivateRedis
) -> None:
    # The archiver's Redis is a private one we can stop; the dead letter must survive both
    # the outage and the archiver stopping during it.
    settings = archiver_settings.model_copy(update={"redis_url": private_redis.url})
    app = create_app(settings)
    connection = await AmqpConnection(amqp_url, client_name="test").connect()

    async def counts() -> tuple[int, int]:
        """(ready, consumers) of courier.dead-letters, from a fresh passive declare."""
        async with await connection.connection.channel() as fresh:
            queue = await fresh.declare_queue(DEAD_LETTER_QUEUE, passive=True)
            result: Any = queue.declaration_result
            return int(result.message_count), int(result.consumer_count)

    try:
        async with (
            LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=manager.app), base_url="http://archiver"
            ) as archiver,
        ):

            async def ready() -> bool:
                return (await archiver.get("/readyz")).status_code == 200

            await eventually(ready, timeout=30, what="the archiver to consume")
            private_redis.stop()
            with structlog.testing.capture_logs() as logs:
                await dead_letters(amqp_url, 1)

                async def held() -> bool:
                    ready_now, consumers = await counts()
                    return ready_now == 0 and consumers == 1

                def retrying() -> bool:  # two stores failed: it held on through a backoff
                    failed = [e for e in logs if e["event"] == "archive_store_failed"]
                    return len(failed) >= 2

                await eventually(held, what="the archiver to hold the dead letter")
                await eventually(retrying, what="the archiver to retry the store")

        # Stopped: the delivery was given back, not acked and not dropped.
        async def given_back() -> bool:
            ready_now, consumers = await counts()
            return ready_now == 1 and consumers == 0

        await eventually(given_back, what="the dead letter back in its queue")
        private_redis.start()
        async with (
            LifespanManager(create_app(settings), startup_timeout=30) as manager,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=manager.app), base_url="http://archiver"
            ) as archiver,
        ):
            [record] = await wait_records(archiver, 1)
        assert record["message_id"] == "dead-0"
        assert (await counts())[0] == 0
    finally:
        await connection.close()
