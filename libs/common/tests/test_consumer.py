"""The consumer runner on a real broker: ack, retry through the tiers, dead-letter."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
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
from tests.support.helpers import eventually, get_all, message_for, ready_count
from tests.support.messaging import WORK, Pinged

Handler = Callable[[Event[Pinged]], Awaitable[None]]


@pytest.fixture
async def start_runner(
    connection: AmqpConnection, declared: DeclaredTopology, metrics: MessagingMetrics
) -> AsyncIterator[Callable[..., Awaitable[ConsumerRunner]]]:
    runners: list[ConsumerRunner] = []

    async def start(handler: Handler, **kwargs: Any) -> ConsumerRunner:
        router = Router()
        router.add(Pinged, handler)
        runner = ConsumerRunner(
            connection=connection,
            queue=WORK,
            router=router,
            metrics=metrics,
            consumer_name="tests",
            prefetch=kwargs.pop("prefetch", 8),
            **kwargs,
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

    await start_runner(handler)
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
    await asyncio.sleep(1.0)  # nothing else arrives: no extra attempt after the budget
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
