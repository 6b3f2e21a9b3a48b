"""Registration: validation, the 201 contract, one event per accepted registration."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections import Counter

import httpx
import pytest
import redis.asyncio

from courier_testing.events import EventTap
from tests.support.helpers import outbox_emptied, user_payload

TRACEPARENT = re.compile(r"^00-(?P<trace>[0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_registration_emits_one_user_registered_event(
    client: httpx.AsyncClient,
    event_tap: EventTap,
    redis_client: redis.asyncio.Redis,
    redis_prefix: str,
) -> None:
    response = await client.post(
        "/v1/users",
        json=user_payload(
            "Ada.Lovelace@Example.COM",
            locale="zh-cn",
            channels=["sms", "email"],
            phone="+14155552671",
        ),
        headers={"traceparent": f"00-{CALLER_TRACE}-00f067aa0ba902b7-01"},
    )
    assert response.status_code == 201, response.text
    user = response.json()
    assert response.headers["location"] == f"/v1/users/{user['id']}"
    assert user["email"] == "Ada.Lovelace@example.com"
    assert user["locale"] == "zh-CN"
    assert user["channels"] == ["email", "sms"]
    assert uuid.UUID(user["id"]).version == 7

    [message] = await event_tap.collect(1)
    await outbox_emptied(redis_client, redis_prefix)
    assert len(await event_tap.collect(1)) == 1  # and no second one
    body = json.loads(message.body)
    assert body["specversion"] == "1.0"
    assert body["type"] == "user.registered"
    assert body["source"] == "urn:courier:user-service"
    assert body["datacontenttype"] == "application/json"
    assert body["version"] == 1
    assert uuid.UUID(body["id"]).version == 7
    assert body["data"] == {
        "user_id": user["id"],
        "email": "Ada.Lovelace@example.com",
        "display_name": "Ada",
        "locale": "zh-CN",
        "channels": ["email", "sms"],
        "phone": "+14155552671",
        "push_token": None,
    }
    assert message.message_id == body["id"]
    assert message.content_type == "application/json"
    assert message.type == "user.registered"
    assert message.routing_key == "user.registered"
    assert message.delivery_mode == 2
    assert message.timestamp is not None
    # The caller's trace continues through the outbox into the message.
    traceparent = TRACEPARENT.match(str(message.headers["traceparent"]))
    assert traceparent is not None
    assert traceparent["trace"] == CALLER_TRACE


async def test_concurrent_registrations_claim_each_email_once(
    client: httpx.AsyncClient,
    event_tap: EventTap,
    redis_client: redis.asyncio.Redis,
    redis_prefix: str,
) -> None:
    bodies = [user_payload(f"user{i}@example.com") for i in range(80)]
    bodies += [user_payload("Same@Example.com") for _ in range(20)]
    responses = await asyncio.gather(*(client.post("/v1/users", json=b) for b in bodies))

    by_email: dict[str, Counter[int]] = {}
    for body, response in zip(bodies, responses, strict=True):
        by_email.setdefault(body["email"].lower(), Counter())[response.status_code] += 1
    assert by_email.pop("same@example.com") == Counter({201: 1, 409: 19})
    assert all(statuses == Counter({201: 1}) for statuses in by_email.values())

    await outbox_emptied(redis_client, redis_prefix)
    await event_tap.collect(81)
    events = event_tap.bodies()
    assert len(events) == 81
    emails = Counter(e["data"]["email"].lower() for e in events)
    assert emails["same@example.com"] == 1
    assert len(emails) == 81
    conflict = next(r for r in responses if r.status_code == 409)
    assert conflict.headers["content-type"] == "application/problem+json"
    assert conflict.json()["title"] == "Email already registered"
    assert "same@example.com" not in conflict.text.lower()


async def test_idempotency_key_replays_the_first_response(
    client: httpx.AsyncClient,
    event_tap: EventTap,
    redis_client: redis.asyncio.Redis,
    redis_prefix: str,
) -> None:
    headers = {"Idempotency-Key": "signup-7f3a"}
    first = await client.post("/v1/users", json=user_payload(), headers=headers)
    again = await client.post("/v1/users", json=user_payload(), headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.content == first.content
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true"

    other = await client.post(
        "/v1/users", json=user_payload(display_name="Someone else"), headers=headers
    )
    assert other.status_code == 422
    assert other.json()["title"] == "Idempotency-Key reused"

    await event_tap.collect(1)
    await outbox_emptied(redis_client, redis_prefix)
    assert len(await event_tap.collect(1)) == 1


async def test_idempotency_key_replays_a_conflict_too(client: httpx.AsyncClient) -> None:
    assert (await client.post("/v1/users", json=user_payload())).status_code == 201
    headers = {"Idempotency-Key": "retry-1"}
    first = await client.post("/v1/users", json=user_payload(), headers=headers)
    again = await client.post("/v1/users", json=user_payload(), headers=headers)
    assert first.status_code == again.status_code == 409
    assert again.json() == first.json()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (user_payload("not-an-email"), "email"),
        (user_payload("a" * 10_000 + "@example.com"), "email"),
        (user_payload(locale="english please"), "locale"),
        (user_payload(channels=["sms"]), "phone"),
        (user_payload(channels=["push"]), "push_token"),
        (user_payload(channels=["email", "email"]), "channels"),
        (user_payload(channels=["fax"]), "channels"),
        (user_payload(channels=["sms"], phone="4155552671"), "phone"),
        (user_payload(display_name=""), "display_name"),
        (user_payload(display_name="bad\r\nname"), "display_name"),
        ({**user_payload(), "password": "hunter2"}, "password"),
        ({"display_name": "no email"}, "email"),
    ],
)
async def test_invalid_registrations_get_a_problem_without_echo(
    client: httpx.AsyncClient, body: dict[str, object], field: str
) -> None:
    response = await client.post("/v1/users", json=body)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 422
    assert any(
        field in json.dumps(error["loc"]) or field in error["msg"] for error in problem["errors"]
    ), problem
    for secret in ("hunter2", "a" * 100, "not-an-email", "english please"):
        assert secret not in response.text


async def test_oversized_and_malformed_bodies(client: httpx.AsyncClient) -> None:
    big = await client.post(
        "/v1/users",
        content=b'{"email": "' + b"x" * (1024 * 1024) + b'"}',
        headers={"content-type": "application/json"},
    )
    assert big.status_code == 413
    assert big.headers["content-type"] == "application/problem+json"
    nested = await client.post(
        "/v1/users", content=b"[" * 5000 + b"]" * 5000, headers={"content-type": "application/json"}
    )
    assert 400 <= nested.status_code < 500
    garbage = await client.post(
        "/v1/users", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert 400 <= garbage.status_code < 500
    assert "nope" not in garbage.text
