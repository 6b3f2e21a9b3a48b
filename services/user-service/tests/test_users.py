"""Reading, looking up, updating and erasing users, and the events those changes emit."""

from __future__ import annotations

import uuid

import httpx

from courier_testing.events import EventTap
from tests.support.helpers import user_payload


async def register(client: httpx.AsyncClient, **extra: object) -> dict[str, object]:
    response = await client.post("/v1/users", json=user_payload(**extra))  # type: ignore[arg-type]
    assert response.status_code == 201, response.text
    user: dict[str, object] = response.json()
    return user


async def test_read_and_lookup(client: httpx.AsyncClient) -> None:
    user = await register(client)
    assert (await client.get(f"/v1/users/{user['id']}")).json() == user
    found = await client.get("/v1/users", params={"email": "ADA@example.com"})
    assert found.json() == {"items": [user]}
    none = await client.get("/v1/users", params={"email": "nobody@example.com"})
    assert none.json() == {"items": []}
    missing = await client.get(f"/v1/users/{uuid.uuid4()}")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert (await client.get("/v1/users/not-a-uuid")).status_code == 422


async def test_patch_emits_user_updated_with_previous_channels(
    client: httpx.AsyncClient, event_tap: EventTap
) -> None:
    user = await register(client)
    response = await client.patch(
        f"/v1/users/{user['id']}",
        json={"channels": ["email", "push"], "push_token": "tok-123", "locale": "zh-CN"},
    )
    assert response.status_code == 200, response.text
    updated = response.json()
    assert updated["channels"] == ["email", "push"]
    assert updated["updated_at"] > updated["created_at"]

    same = await client.patch(f"/v1/users/{user['id']}", json={"locale": "zh-CN"})
    assert same.json() == updated  # no change, no event
    # A real change after it: the outbox keeps one user's events in order, so an event of the
    # no-op PATCH would arrive before this one's.
    renamed = await client.patch(f"/v1/users/{user['id']}", json={"display_name": "Ada L"})
    assert renamed.status_code == 200, renamed.text

    await event_tap.collect(3)
    events = event_tap.bodies()
    assert [e["type"] for e in events] == ["user.registered", "user.updated", "user.updated"]
    data = events[1]["data"]
    assert data["previous_channels"] == ["email"]
    assert data["channels"] == ["email", "push"]
    assert sorted(data["changed"]) == ["channels", "locale", "push_token"]
    assert events[2]["data"]["changed"] == ["display_name"]


async def test_patch_refuses_an_inconsistent_result(client: httpx.AsyncClient) -> None:
    user = await register(client)
    response = await client.patch(f"/v1/users/{user['id']}", json={"channels": ["sms"]})
    assert response.status_code == 422
    assert "phone is required" in response.json()["detail"]
    nulled = await client.patch(f"/v1/users/{user['id']}", json={"display_name": None})
    assert nulled.status_code == 422


async def test_delete_erases_and_frees_the_email(
    client: httpx.AsyncClient, event_tap: EventTap
) -> None:
    user = await register(client)
    assert (await client.delete(f"/v1/users/{user['id']}")).status_code == 204
    assert (await client.get(f"/v1/users/{user['id']}")).status_code == 404
    assert (await client.delete(f"/v1/users/{user['id']}")).status_code == 404
    assert (await client.get("/v1/users", params={"email": "ada@example.com"})).json() == {
        "items": []
    }
    again = await register(client)
    assert again["id"] != user["id"]
    await event_tap.collect(3)
    assert [e["type"] for e in event_tap.bodies()] == [
        "user.registered",
        "user.deleted",
        "user.registered",
    ]
    assert event_tap.bodies()[1]["data"] == {"user_id": user["id"]}
