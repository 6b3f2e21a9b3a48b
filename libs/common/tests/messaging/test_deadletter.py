"""The dead-letter contract: diagnosis headers written and read back, retry and replay headers.

Pure functions, so most of this runs without a broker: the ``x-death`` shapes below were
recorded from RabbitMQ 3.10 (quorum queues, ``at-least-once`` dead-lettering), and
``test_the_broker_still_writes_the_recorded_shapes`` provokes each one on the real broker and
holds the recording to it.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustChannel
from hypothesis import given
from hypothesis import strategies as st
from pamqp import decode, encode

from courier_common.messaging import headers as names
from courier_common.messaging.deadletter import (
    DROPPED_ON_REPLAY,
    MAX_REASON_CHARS,
    Diagnosis,
    FailureKind,
    attempt_of,
    dead_letter_headers,
    deaths_of,
    replay_headers,
    retry_headers,
)

DIED = datetime(2026, 12, 2, 7, 18, tzinfo=UTC)


def death(queue: str, reason: str, *, count: int = 1) -> dict[str, Any]:
    """One ``x-death`` entry as aio-pika decodes it from RabbitMQ 3.10."""
    return {
        "count": count,
        "reason": reason,
        "queue": queue,
        "time": DIED,
        "exchange": "",
        "routing-keys": [queue],
    }


def broker_dead_letter(queue: str, reason: str) -> dict[str, Any]:
    """The headers of a message the broker dead-lettered from ``queue`` by itself."""
    return {
        "x-death": [death(queue, reason)],
        "x-delivery-count": 0,
        "x-first-death-exchange": "",
        "x-first-death-queue": queue,
        "x-first-death-reason": reason,
    }


#: reason in x-death -> the failure kind it reads as
BROKER_SHAPES = {
    "rejected": FailureKind.BROKER_REJECTED,  # basic.reject / nack without requeue
    "delivery_limit": FailureKind.BROKER_DELIVERY_LIMIT,  # quorum x-delivery-limit passed
    "expired": FailureKind.BROKER_EXPIRED,  # x-message-ttl
    "maxlen": FailureKind.BROKER_MAXLEN,  # x-max-length with drop-head
}


@pytest.mark.parametrize("reason", sorted(BROKER_SHAPES))
def test_a_dead_letter_of_the_broker_reads_from_x_death(reason: str) -> None:
    diagnosis = Diagnosis.read(broker_dead_letter("work", reason))
    assert diagnosis.kind is BROKER_SHAPES[reason]
    assert diagnosis.kind.by_broker
    assert diagnosis.reason == f"dead-lettered by the broker: {reason} (count 1)"
    assert diagnosis.source_queue == "work"
    assert diagnosis.original_exchange == ""
    assert diagnosis.original_routing_key == "work"
    assert diagnosis.attempts == 1
    assert diagnosis.first_failed_at == DIED
    assert diagnosis.exception is None


def test_a_worker_that_died_past_the_delivery_limit_after_a_retry_keeps_its_route() -> None:
    # Published to courier.events, retried once (the tier's TTL sent it back), then the worker
    # died on it until the quorum queue's delivery limit dead-lettered it: most recent first.
    headers = {
        names.ATTEMPT: 2,
        names.ORIGINAL_EXCHANGE: "courier.events",
        names.ORIGINAL_ROUTING_KEY: "user.registered",
        names.FIRST_FAILED_AT: "2026-12-02T07:17:55+00:00",
        "x-death": [death("work", "delivery_limit"), death("work.retry.5s", "expired")],
    }
    diagnosis = Diagnosis.read(headers)
    assert diagnosis.kind is FailureKind.BROKER_DELIVERY_LIMIT
    assert diagnosis.source_queue == "work"
    assert diagnosis.original_exchange == "courier.events"
    assert diagnosis.original_routing_key == "user.registered"
    assert diagnosis.attempts == 2
    assert diagnosis.first_failed_at == datetime(2026, 12, 2, 7, 17, 55, tzinfo=UTC)
    assert [d.reason for d in diagnosis.deaths] == ["delivery_limit", "expired"]


def test_courier_s_own_diagnosis_wins_over_the_broker_s_history() -> None:
    ours = Diagnosis(
        kind=FailureKind.PERMANENT,
        reason="SMTP 550: mailbox unavailable",
        source_queue="work",
        original_exchange="courier.events",
        original_routing_key="user.registered",
        attempts=3,
        exception="notification_service.senders.SendError",
        first_failed_at=DIED,
    )
    headers = dead_letter_headers({"x-death": [death("work.retry.5s", "expired")]}, ours)
    assert Diagnosis.read(headers) == ours


def test_unknown_kinds_and_broker_reasons_read_as_unknown() -> None:
    assert FailureKind.parse("something-new") is FailureKind.UNKNOWN
    assert Diagnosis.read(broker_dead_letter("q", "a-future-reason")).kind is FailureKind.UNKNOWN
    nothing = Diagnosis.read({})
    assert nothing.kind is FailureKind.UNKNOWN
    assert nothing.source_queue is None
    assert "no diagnosis" in nothing.reason


def test_odd_header_values_never_raise() -> None:
    headers = {
        names.FAILURE_REASON: b"\xff\xfe bytes",
        names.ATTEMPT: b"not a number",
        names.FIRST_FAILED_AT: "yesterday",
        "x-death": ["not a table", {"count": "three", "routing-keys": "not a list"}],
    }
    diagnosis = Diagnosis.read(headers)
    assert diagnosis.reason.endswith(" bytes")
    assert diagnosis.attempts == 1
    assert diagnosis.first_failed_at is None
    assert deaths_of(headers)[0].count == 1


NO_SURROGATES = st.characters(exclude_categories=["Cs"])
header_text = st.text(alphabet=NO_SURROGATES, min_size=0, max_size=300)
diagnoses = st.builds(
    Diagnosis,
    kind=st.sampled_from(FailureKind),
    reason=st.text(alphabet=NO_SURROGATES, max_size=2500),
    source_queue=st.none() | header_text.filter(bool),
    original_exchange=st.none() | header_text,
    original_routing_key=st.none() | header_text,
    attempts=st.integers(min_value=1, max_value=10_000),
    exception=st.none() | header_text.filter(lambda s: s not in ("", "none")),
    first_failed_at=st.none()
    | st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
)


def over_the_wire(headers: dict[str, Any]) -> dict[str, Any]:
    """The headers after AMQP's field-table encoding and decoding, as a consumer gets them."""
    _, decoded = decode.field_table(encode.field_table(headers))
    return decoded


@given(diagnoses)
def test_writing_then_reading_a_diagnosis_round_trips(diagnosis: Diagnosis) -> None:
    read = Diagnosis.read(over_the_wire(diagnosis.to_headers()))
    assert read == diagnosis
    assert len(read.reason) <= MAX_REASON_CHARS


@given(
    st.dictionaries(
        st.text(max_size=20),
        st.none()
        | st.booleans()
        | st.integers()
        | st.text(max_size=50)
        | st.binary(max_size=50)
        | st.lists(st.dictionaries(st.text(max_size=10), st.text(max_size=10)), max_size=3),
        max_size=8,
    )
)
def test_reading_any_headers_never_raises(headers: dict[str, Any]) -> None:
    Diagnosis.read(headers)
    attempt_of(headers)


def test_a_retry_hop_counts_the_attempt_and_remembers_the_first_route() -> None:
    now = datetime(2026, 12, 2, tzinfo=UTC)
    first = retry_headers(
        {"app": "kept", **broker_dead_letter("x", "expired")},
        attempt=1,
        exchange="courier.events",
        routing_key="user.registered",
        now=now,
    )
    assert first == {
        "app": "kept",
        names.ATTEMPT: 2,
        names.ORIGINAL_EXCHANGE: "courier.events",
        names.ORIGINAL_ROUTING_KEY: "user.registered",
        names.FIRST_FAILED_AT: now.isoformat(),
    }
    # back from the tier through the default exchange: the first route and time are kept
    second = retry_headers(
        first, attempt=2, exchange="", routing_key="work", now=now + timedelta(seconds=5)
    )
    assert second == {**first, names.ATTEMPT: 3}


def test_a_replay_drops_the_diagnosis_and_keeps_the_route_and_other_headers() -> None:
    diagnosis = Diagnosis(
        kind=FailureKind.RETRIES_EXHAUSTED,
        reason="gave up",
        source_queue="work",
        original_exchange="courier.events",
        original_routing_key="user.registered",
        attempts=5,
        first_failed_at=DIED,
    )
    dead = dead_letter_headers(
        {
            "app": "kept",
            "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01",
            names.REPLAY_OF: "older-record",
            names.REPLAY_ID: "single.older",
            **broker_dead_letter("work.retry.5s", "expired"),
        },
        diagnosis,
    )
    replay = replay_headers(dead, replay_of="record-1", replay_id="single.r1", diagnosis=diagnosis)
    assert replay == {
        "app": "kept",
        names.ORIGINAL_EXCHANGE: "courier.events",
        names.ORIGINAL_ROUTING_KEY: "user.registered",
        names.REPLAY_OF: "record-1",
        names.REPLAY_ID: "single.r1",
    }
    assert attempt_of(replay) == 1  # a fresh budget
    assert names.FAILURE_REASON in DROPPED_ON_REPLAY


# --- the recording, held to the real broker -----------------------------------------------


async def test_the_broker_still_writes_the_recorded_shapes(channel: AbstractRobustChannel) -> None:
    dlx = await channel.declare_exchange("xdeath.dlx", aio_pika.ExchangeType.FANOUT, durable=True)
    dead = await channel.declare_queue(
        "xdeath.dead", durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead.bind(dlx)
    base: dict[str, Any] = {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "xdeath.dlx",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    arguments: dict[str, dict[str, Any]] = {
        "rejected": base,
        "expired": {**base, "x-message-ttl": 100},
        "delivery_limit": {**base, "x-delivery-limit": 1},
        # at-least-once dead-lettering needs reject-publish, which never drops a head
        "maxlen": {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": "xdeath.dlx",
            "x-max-length": 1,
            "x-overflow": "drop-head",
        },
    }
    queues = {
        reason: await channel.declare_queue(f"xdeath.{reason}", durable=True, arguments=args)
        for reason, args in arguments.items()
    }
    for reason in ("rejected", "expired", "delivery_limit", "maxlen", "maxlen"):
        await channel.default_exchange.publish(
            aio_pika.Message(b"x", message_id=reason), routing_key=f"xdeath.{reason}"
        )
    rejected = await queues["rejected"].get(timeout=5)
    await rejected.reject(requeue=False)
    for _ in range(2):  # the second return passes the limit of 1
        returned = await queues["delivery_limit"].get(timeout=5)
        await returned.nack(requeue=True)
        await asyncio.sleep(0.2)

    seen: dict[str, dict[str, Any]] = {}
    deadline = asyncio.get_running_loop().time() + 20
    while len(seen) < len(BROKER_SHAPES) and asyncio.get_running_loop().time() < deadline:
        message = await dead.get(timeout=5, fail=False)
        if message is None:
            await asyncio.sleep(0.2)
            continue
        assert message.message_id is not None
        seen[message.message_id] = dict(message.headers)
        await message.ack()
    assert set(seen) == set(BROKER_SHAPES)
    for reason, headers in seen.items():
        recorded = broker_dead_letter(f"xdeath.{reason}", reason)
        # Newer brokers add headers (3.13: x-last-death-*); the recorded ones must be there.
        assert set(recorded) - {"x-delivery-count"} <= set(headers), reason
        assert recorded["x-death"][0].keys() <= headers["x-death"][0].keys(), reason
        assert headers["x-death"][0]["reason"] == reason
        diagnosis = Diagnosis.read(headers)
        assert diagnosis.kind is BROKER_SHAPES[reason]
        assert diagnosis.source_queue == f"xdeath.{reason}"
