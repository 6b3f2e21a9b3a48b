"""The consumer runner on a real broker: ack, retry through the tiers, dead-letter; and in
worker processes that die, or are told to stop, in the middle of handling a message."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import redis.asyncio
from aio_pika.abc import AbstractRobustChannel

from courier_common.messaging import (
    DEAD_LETTERS,
    Ack,
    ConsumerRunner,
    DeadLetter,
    Delivery,
    DeliveryLoop,
    Event,
    FailureKind,
    IdempotencyStore,
    PermanentError,
    Publisher,
    PublishNackedError,
    Requeue,
    RetryableError,
    Router,
    Settlement,
    Topology,
    current_delivery,
    declare_topology,
    diagnose,
    new_event,
)
from courier_common.messaging.connection import AmqpConnection
from courier_common.messaging.topology import DeclaredTopology
from courier_common.metrics import MessagingMetrics
from courier_testing.backing import BrokerAdmin, BrokerVhost
from courier_testing.events import Pinged, message_for
from courier_testing.polling import eventually, get_all, ready_count

from .support import WORK

Handler = Callable[[Event[Pinged]], Awaitable[None]]


@pytest.fixture
async def start_runner(
    connection: AmqpConnection, declared: DeclaredTopology, metrics: MessagingMetrics
) -> AsyncIterator[Callable[..., Awaitable[ConsumerRunner]]]:
    runners: list[ConsumerRunner] = []

    async def start(handler: Handler, **kwargs: Any) -> ConsumerRunner:
        router = Router()
        router.add(Pinged, handler)
        options: dict[str, Any] = {"consumer_name": "tests", "prefetch": 8, **kwargs}
        runner = ConsumerRunner(
            connection=connection, queue=WORK, router=router, metrics=metrics, **options
        )
        await runner.start()
        runners.append(runner)
        return runner

    yield start
    for runner in runners:
        await runner.stop(timeout=5)


async def publish(channel: AbstractRobustChannel, *events: Event[Any]) -> None:
    publisher = Publisher(channel)
    for event in events:
        await publisher.publish_event(event)


async def all_settled(
    channel: AbstractRobustChannel, *runners: ConsumerRunner, except_dead: bool = True
) -> None:
    """Wait until the work queue and its tiers hold nothing and no runner holds anything."""
    names = [WORK.name, *WORK.retry_queue_names]
    if not except_dead:
        names.append("courier.dead-letters")

    async def settled() -> bool:
        counts = [await ready_count(channel, name) for name in names]
        return not any(counts) and not any(r.in_flight for r in runners)

    await eventually(settled, timeout=20, interval=0.1, what="every work queue to be empty")


def count(metrics: MessagingMetrics, outcome: str) -> float:
    value: float = metrics.consumed.labels("courier-test.work", "test.pinged", outcome)._value.get()
    return value


async def test_success_is_acked_and_handled_once(
    start_runner: Callable[..., Awaitable[ConsumerRunner]],
    channel: AbstractRobustChannel,
    metrics: MessagingMetrics,
) -> None:
    seen: list[tuple[int, int]] = []

    async def handler(event: Event[Pinged]) -> None:
        seen.append((event.data.n, current_delivery().attempt))

    runner = await start_runner(handler)
    await publish(channel, *(new_event(Pinged(n=i), source="t") for i in range(20)))
    await eventually(lambda: len(seen) == 20, what="20 messages handled")
    await all_settled(channel, runner, except_dead=False)
    assert sorted(seen) == [(i, 1) for i in range(20)]
    assert count(metrics, "acked") == 20


async def test_retryable_twice_then_success_waits_the_tiers(
    start_runner: Callable[..., Awaitable[ConsumerRunner]],
    channel: AbstractRobustChannel,
    metrics: MessagingMetrics,
) -> None:
    attempts: list[int] = []
    moments: list[float] = []
    done = asyncio.Event()

    async def handler(event: Event[Pinged]) -> None:
        attempts.append(current_delivery().attempt)
        moments.append(time.monotonic())
        if len(attempts) < 3:
            raise RetryableError("provider answered 503")
        done.set()

    runner = await start_runner(handler)
    await publish(channel, new_event(Pinged(n=1), source="t"))
    await asyncio.wait_for(done.wait(), 20)
    await all_settled(channel, runner, except_dead=False)

    assert attempts == [1, 2, 3]
    assert moments[1] - moments[0] >= 0.3
    assert moments[2] - moments[1] >= 0.6
    assert count(metrics, "retried") == 2
    assert count(metrics, "acked") == 1


async def test_always_retryable_is_dead_lettered_after_the_budget(
    start_runner: Callable[..., Awaitable[ConsumerRunner]],
    channel: AbstractRobustChannel,
    metrics: MessagingMetrics,
) -> None:
    attempts: list[int] = []

    async def handler(event: Event[Pinged]) -> None:
        attempts.append(current_delivery().attempt)
        raise RetryableError("SMTP 451 try later")

    runner = await start_runner(handler)
    event = new_event(Pinged(n=1), source="t")
    await publish(channel, event)
    [dead] = await get_all(channel, "courier.dead-letters", expect=1, timeout=20)

    assert attempts == [1, 2, 3] == list(range(1, WORK.retry.max_attempts + 1))
    headers = dead.headers
    assert headers["x-courier-failure-kind"] == "retries-exhausted"
    assert "gave up after 3 attempts" in str(headers["x-courier-failure-reason"])
    assert "SMTP 451 try later" in str(headers["x-courier-failure-reason"])
    assert headers["x-courier-exception"] == "courier_common.messaging.retry.RetryableError"
    assert headers["x-courier-original-exchange"] == "courier.events"
    assert headers["x-courier-original-routing-key"] == "test.pinged"
    assert headers["x-courier-original-queue"] == "courier-test.work"
    assert headers["x-courier-attempt"] == 3
    assert "x-courier-first-failed-at" in headers
    assert dead.routing_key == "test.pinged"
    assert dead.message_id == str(event.id)
    assert dead.body == event.encode()
    assert count(metrics, "dead_lettered") == 1
    # Nothing left in the queue, its tiers or the runner: no attempt can follow the budget's.
    await all_settled(channel, runner)
    assert attempts == [1, 2, 3]


async def test_permanent_error_is_dead_lettered_on_first_delivery(
    start_runner: Callable[..., Awaitable[ConsumerRunner]],
    channel: AbstractRobustChannel,
) -> None:
    attempts: list[int] = []

    async def handler(event: Event[Pinged]) -> None:
        attempts.append(current_delivery().attempt)
        raise PermanentError("SMTP 550 mailbox unavailable")

    await start_runner(handler)
    await publish(channel, new_event(Pinged(n=1), source="t"))
    [dead] = await get_all(channel, "courier.dead-letters", expect=1)
    assert attempts == [1]
    assert dead.headers["x-courier-failure-kind"] == "permanent"
    assert dead.headers["x-courier-failure-reason"] == "SMTP 550 mailbox unavailable"
    assert dead.headers["x-courier-exception"] == "courier_common.messaging.retry.PermanentError"
    assert dead.headers["x-courier-attempt"] == 1


def bad_messages() -> list[tuple[str, aio_pika.Message, str]]:
    good = new_event(Pinged(n=0), source="t")
    wrong_type = message_for(good)
    wrong_type.content_type = "text/plain"
    unknown = message_for(good)
    unknown.body = good.encode().replace(b'"test.pinged"', b'"test.unheard-of"')
    version = message_for(good)
    version.body = good.encode().replace(b'"version":1', b'"version":42')
    return [
        (
            "bytes",
            aio_pika.Message(b"\x00\xffnot json", content_type="application/json"),
            "not UTF-8",
        ),
        ("content type", wrong_type, "content type 'text/plain'"),
        ("unknown type", unknown, "unknown event type 'test.unheard-of'"),
        ("unknown version", version, "unknown version 42 of 'test.pinged'"),
    ]


async def test_undecodable_messages_are_dead_lettered_and_the_worker_goes_on(
    start_runner: Callable[..., Awaitable[ConsumerRunner]],
    channel: AbstractRobustChannel,
    metrics: MessagingMetrics,
) -> None:
    handled: list[int] = []

    async def handler(event: Event[Pinged]) -> None:
        handled.append(event.data.n)

    runner = await start_runner(handler, prefetch=1)
    exchange = await channel.get_exchange("courier.events")
    bad = bad_messages()
    for i, (_, message, _) in enumerate(bad):
        await exchange.publish(message, routing_key="test.pinged")
        await exchange.publish(
            message_for(new_event(Pinged(n=i), source="t")), routing_key="test.pinged"
        )
    dead = await get_all(channel, "courier.dead-letters", expect=len(bad))
    await eventually(lambda: len(handled) == len(bad), what="the good messages")
    await all_settled(channel, runner)

    reasons = [str(m.headers["x-courier-failure-reason"]) for m in dead]
    for (name, _, expected), reason in zip(bad, reasons, strict=True):
        assert expected in reason, name
    assert all(m.headers["x-courier-failure-kind"] == "undecodable" for m in dead)
    assert all(m.headers["x-courier-attempt"] == 1 for m in dead)
    assert all(str(m.headers["x-courier-exception"]).endswith("EnvelopeError") for m in dead)
    assert sorted(handled) == list(range(len(bad)))
    unknown_label = metrics.consumed.labels("courier-test.work", "unknown", "dead_lettered")
    assert unknown_label._value.get() == len(bad)


async def test_the_same_event_twice_has_its_effect_once(
    start_runner: Callable[..., Awaitable[ConsumerRunner]],
    channel: AbstractRobustChannel,
    metrics: MessagingMetrics,
    redis_client: redis.asyncio.Redis,
    redis_prefix: str,
) -> None:
    effects: list[int] = []

    async def handler(event: Event[Pinged]) -> None:
        await asyncio.sleep(0.05)
        effects.append(event.data.n)

    idempotency = IdempotencyStore(redis_client, prefix=redis_prefix, lease_seconds=2)
    runner = await start_runner(handler, idempotency=idempotency)
    event = new_event(Pinged(n=5), source="t")
    await publish(channel, event)
    await eventually(lambda: effects == [5], what="the first delivery")
    await publish(channel, event, event)  # the same event id, delivered again twice
    await eventually(lambda: count(metrics, "duplicate") == 2, what="two duplicates")
    await all_settled(channel, runner, except_dead=False)
    assert effects == [5]
    assert count(metrics, "acked") == 1


async def test_concurrent_duplicates_wait_for_the_holder_then_skip(
    start_runner: Callable[..., Awaitable[ConsumerRunner]],
    channel: AbstractRobustChannel,
    metrics: MessagingMetrics,
    redis_client: redis.asyncio.Redis,
    redis_prefix: str,
) -> None:
    """Two copies in flight at once: one claims, the other waits for it, then is skipped.

    No retry is spent on a claim that its holder is about to complete.
    """
    effects: list[int] = []

    async def handler(event: Event[Pinged]) -> None:
        await asyncio.sleep(0.2)
        effects.append(event.data.n)

    idempotency = IdempotencyStore(redis_client, prefix=redis_prefix, lease_seconds=5)
    runner = await start_runner(handler, idempotency=idempotency)
    event = new_event(Pinged(n=9), source="t")
    await publish(channel, event, event)
    await eventually(lambda: count(metrics, "duplicate") == 1, what="the copy to be skipped")
    await all_settled(channel, runner, except_dead=False)
    assert effects == [9]
    assert count(metrics, "retried") == 0


async def test_stop_lets_in_flight_messages_finish(
    start_runner: Callable[..., Awaitable[ConsumerRunner]],
    channel: AbstractRobustChannel,
) -> None:
    started: list[int] = []
    finished: list[int] = []

    async def handler(event: Event[Pinged]) -> None:
        started.append(event.data.n)
        await asyncio.sleep(0.5)
        finished.append(event.data.n)

    runner = await start_runner(handler, prefetch=4)
    await publish(channel, *(new_event(Pinged(n=i), source="t") for i in range(4)))
    await eventually(lambda: len(started) == 4, what="4 in flight")
    assert await runner.stop(timeout=10) is True
    assert sorted(finished) == [0, 1, 2, 3]
    await all_settled(channel, runner, except_dead=False)


async def test_a_crash_of_the_runner_itself_is_dead_lettered_with_a_diagnosis(
    start_runner: Callable[..., Awaitable[ConsumerRunner]],
    channel: AbstractRobustChannel,
    metrics: MessagingMetrics,
) -> None:
    async def handler(event: Event[Pinged]) -> None:
        raise AssertionError("the handler is never reached")

    runner = await start_runner(handler)

    def broken_decode(body: bytes, *, content_type: str | None) -> Event[Any]:
        raise ZeroDivisionError("a bug in decoding")

    runner.router.catalog.decode = broken_decode  # type: ignore[method-assign]
    event = new_event(Pinged(n=1), source="t")
    await publish(channel, event)
    [dead] = await get_all(channel, "courier.dead-letters", expect=1)
    assert dead.headers["x-courier-failure-kind"] == "crashed"
    assert "ZeroDivisionError('a bug in decoding')" in str(dead.headers["x-courier-failure-reason"])
    assert dead.headers["x-courier-exception"] == "builtins.ZeroDivisionError"
    assert dead.headers["x-courier-original-queue"] == WORK.name
    assert dead.message_id == str(event.id)
    await all_settled(channel, runner)
    assert metrics.consumed.labels(WORK.name, "unknown", "dead_lettered")._value.get() == 1


async def test_a_dead_letter_that_cannot_be_published_is_rejected_to_the_same_place(
    start_runner: Callable[..., Awaitable[ConsumerRunner]],
    channel: AbstractRobustChannel,
) -> None:
    async def handler(event: Event[Pinged]) -> None:
        raise PermanentError("no such mailbox")

    runner = await start_runner(handler)

    async def failing_publish(message: Any) -> None:
        raise PublishNackedError("the broker refused it")

    assert runner.loop._publisher is not None
    runner.loop._publisher.publish = failing_publish  # type: ignore[method-assign]
    await publish(channel, new_event(Pinged(n=1), source="t"))
    [dead] = await get_all(channel, "courier.dead-letters", expect=1)
    # The queue's own at-least-once dead-lettering: x-death, no diagnosis of ours.
    assert "x-courier-failure-kind" not in dead.headers
    assert dead.headers["x-first-death-reason"] == "rejected"
    assert dead.headers["x-first-death-queue"] == WORK.name
    await all_settled(channel, runner)


class RawRecorder:
    """A raw handler on the delivery loop that decides whatever it is told to."""

    def __init__(self, decide: Callable[[Delivery], Settlement]) -> None:
        self.decide = decide
        self.seen: list[Delivery] = []
        self.settled_with: list[Settlement] = []

    async def handle(self, delivery: Delivery) -> Settlement:
        self.seen.append(delivery)
        return self.decide(delivery)

    def on_crash(self, delivery: Delivery, exc: Exception) -> Settlement:
        return Requeue(repr(exc))

    def settled(self, delivery: Delivery, settlement: Settlement, seconds: float) -> None:
        self.settled_with.append(settlement)


async def test_the_loop_gives_raw_handlers_plain_values_and_applies_their_requeue(
    connection: AmqpConnection, declared: DeclaredTopology, channel: AbstractRobustChannel
) -> None:
    def decide(delivery: Delivery) -> Settlement:
        return Ack() if delivery.redelivered else Requeue("not yet")

    recorder = RawRecorder(decide)
    loop = DeliveryLoop(connection=connection, queue=WORK, handler=recorder, prefetch=1)
    await loop.start()
    try:
        exchange = await channel.get_exchange("courier.events")
        await exchange.publish(
            aio_pika.Message(
                b"raw bytes",
                message_id="raw-1",
                content_type="application/octet-stream",
                headers={"x-courier-attempt": 2, "custom": bytearray(b"\xff")},
            ),
            routing_key="test.raw",
        )
        await eventually(lambda: len(recorder.settled_with) == 2, what="two deliveries")
    finally:
        assert await loop.stop(timeout=5)
    first, second = recorder.seen
    assert (first.body, first.message_id, first.attempt) == (b"raw bytes", "raw-1", 2)
    assert (first.queue, first.exchange, first.routing_key) == (
        WORK.name,
        "courier.events",
        "test.raw",
    )
    assert first.original_exchange == "courier.events"
    assert bytes(first.headers["custom"]) == b"\xff"
    assert not first.redelivered
    assert second.redelivered
    assert [s.outcome for s in recorder.settled_with] == ["requeued", "acked"]
    assert await ready_count(channel, WORK.name) == 0


async def test_a_queue_without_a_dead_letter_exchange_is_never_rejected(
    connection: AmqpConnection, channel: AbstractRobustChannel
) -> None:
    # The dead-letter queue has nowhere to dead-letter to: a settlement it cannot take (a
    # retry, a dead letter) gives the message back instead of dropping it.
    await declare_topology(channel, Topology())
    recorder = RawRecorder(
        lambda d: Ack() if d.redelivered else DeadLetter(diagnose(d, FailureKind.PERMANENT, "x"))
    )
    loop = DeliveryLoop(connection=connection, queue=DEAD_LETTERS, handler=recorder, prefetch=1)
    await loop.start()
    try:
        await channel.default_exchange.publish(
            aio_pika.Message(b"dead", message_id="d-1"), routing_key=DEAD_LETTERS.name
        )
        await eventually(lambda: len(recorder.settled_with) == 2, what="two deliveries")
    finally:
        assert await loop.stop(timeout=5)
    assert [s.outcome for s in recorder.settled_with] == ["requeued", "acked"]


# --- worker processes -------------------------------------------------------------------------

#: libs/common: where ``python -m tests.messaging.worker`` finds this package.
LIBRARY = Path(__file__).resolve().parents[2]
Spawn = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def spawn_worker(
    amqp_url: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> Iterator[Spawn]:
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(**env: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"worker-{len(procs)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.messaging.worker"],
            cwd=LIBRARY,
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

    second = spawn_worker(WORKER_IDEMPOTENT="1", WORKER_LEASE="1")

    async def affected() -> bool:
        return bool(await list_of(redis_client, redis_prefix + "effects"))

    await eventually(affected, timeout=30, what="the effect")
    await settled(broker_admin, vhost)
    # The last worker drains and exits: after that no delivery is in anyone's hands, so the
    # effects and the queue are final (an unacked delivery would be back in the queue).
    second.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(second.wait, 30) == 0
    assert await ready_count(channel, WORK.name) == 0
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
