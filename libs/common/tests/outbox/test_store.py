"""The writer side: a service's script writes its change and the outbox entry, or neither."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import redis.asyncio
from opentelemetry import trace

from courier_common.outbox import EntryFields, Outbox, stream_key
from courier_testing.events import Pinged

#: A service's business logic: claim a name once, and queue the event only when it did.
CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') == false then return 'taken' end
emit_outbox()
return 'claimed'
"""


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def entries(client: redis.asyncio.Redis, stream: str) -> list[dict[str, str]]:
    reply: Any = await client.xrange(stream)
    return [{text(k): text(v) for k, v in fields.items()} for _, fields in reply]


async def test_the_script_writes_its_change_and_the_event_with_its_trace(
    outbox: Outbox, redis_client: redis.asyncio.Redis, redis_prefix: str, stream: str
) -> None:
    claim = outbox.script(CLAIM)
    name = f"{redis_prefix}name:ada"
    with trace.get_tracer("outbox-test").start_as_current_span("claim") as span:
        keys, args = outbox.with_event(Pinged(n=1, note="ada"), keys=[name], args=["owner-1"])
        assert await claim(keys=keys, args=args) == b"claimed"
    # The body's own KEYS[1] and ARGV[1] are what it passed: the event comes after them.
    assert await redis_client.get(name) == b"owner-1"
    [entry] = await entries(redis_client, stream)
    assert set(entry) == {"event", "routing_key", "event_id", "traceparent", "tracestate"}
    event = json.loads(entry["event"])
    assert (event["type"], event["source"], event["data"]) == (
        "test.pinged",
        "urn:courier:outbox-test",
        {"n": 1, "note": "ada"},
    )
    assert entry["routing_key"] == "test.pinged"
    assert entry["event_id"] == event["id"]
    assert uuid.UUID(entry["event_id"]).version == 7
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert entry["traceparent"].split("-")[1] == trace_id
    assert entry["tracestate"] == ""


async def test_a_branch_that_changes_nothing_queues_nothing(
    outbox: Outbox, redis_client: redis.asyncio.Redis, redis_prefix: str, stream: str
) -> None:
    claim = outbox.script(CLAIM)
    name = f"{redis_prefix}name:ada"
    outcomes = []
    for owner in ("owner-1", "owner-2"):
        keys, args = outbox.with_event(Pinged(n=1), keys=[name], args=[owner])
        outcomes.append(await claim(keys=keys, args=args))
    assert outcomes == [b"claimed", b"taken"]
    assert await redis_client.get(name) == b"owner-1"
    assert len(await entries(redis_client, stream)) == 1


async def test_every_entry_is_a_new_event(
    outbox: Outbox, redis_client: redis.asyncio.Redis, redis_prefix: str, stream: str
) -> None:
    claim = outbox.script(CLAIM)
    for n in range(3):
        keys, args = outbox.with_event(Pinged(n=n), keys=[f"{redis_prefix}name:{n}"], args=["x"])
        await claim(keys=keys, args=args)
    found = await entries(redis_client, stream)
    assert [json.loads(e["event"])["data"]["n"] for e in found] == [0, 1, 2]
    assert len({e["event_id"] for e in found}) == 3
    assert all(e["traceparent"] == "" for e in found)  # no span, no trace context


def test_packed_fields_follow_the_order_emit_outbox_reads() -> None:
    fields = EntryFields.pack(Pinged(n=5), source="urn:courier:outbox-test")
    event, routing_key, event_id, traceparent, tracestate = fields.argv()
    assert json.loads(event)["id"] == event_id
    assert (routing_key, traceparent, tracestate) == ("test.pinged", "", "")


def test_a_script_that_never_emits_is_refused(outbox: Outbox) -> None:
    with pytest.raises(ValueError, match="emit_outbox"):
        outbox.script("return redis.call('SET', KEYS[1], ARGV[1])")


def test_the_default_stream_is_the_prefix_and_outbox() -> None:
    # Deployments, runbooks and dashboards know user-service's stream as <prefix>outbox.
    assert stream_key("courier:") == "courier:outbox"
    assert stream_key("courier:", "billing-outbox") == "courier:billing-outbox"
