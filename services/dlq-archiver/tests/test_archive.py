"""Dead letters from the real notifier land in the archive; replay, erase and guard it."""

from __future__ import annotations

import json

import aio_pika
import httpx

from courier_common.messaging import AmqpConnection
from courier_sinks.smtp import SmtpSink
from courier_testing.polling import eventually
from notification_service.routes import USER_EVENTS_QUEUE
from tests.support.archiver import ADMIN, records, wait_records
from tests.support.stack import Stack


async def test_a_permanent_failure_is_archived_with_its_diagnosis(
    stack: Stack, archiver: httpx.AsyncClient, smtp_sink: SmtpSink
) -> None:
    smtp_sink.fail_next(1, 550, "5.1.1 <ada@example.com> mailbox unavailable")
    user = await stack.register("ada@example.com")
    [summary] = await wait_records(archiver, 1)
    assert summary["source_queue"] == USER_EVENTS_QUEUE
    assert summary["event_type"] == "user.registered"
    assert summary["original_exchange"] == "courier.events"
    assert summary["original_routing_key"] == "user.registered"
    assert summary["reason_class"] == "permanent"
    assert "SMTP 550" in summary["reason"]
    assert summary["attempts"] == 1
    assert summary["status"] == "dead"
    assert summary["user_id"] == user["id"]
    assert len(summary["trace_id"] or "") == 32
    assert "ada@example.com" not in json.dumps(summary)

    record = (await archiver.get(f"/v1/dead-letters/{summary['id']}")).json()
    assert "ada@example.com" not in json.dumps(record)  # masked without reveal
    assert record["headers"]["x-courier-failure-kind"] == "permanent"
    revealed = await archiver.get(
        f"/v1/dead-letters/{summary['id']}", params={"reveal": "true"}, headers=ADMIN
    )
    assert json.loads(revealed.json()["body"])["data"]["email"] == "ada@example.com"

    groups = (await archiver.get("/v1/dead-letters/groups")).json()
    assert groups[0]["count"] == 1
    assert groups[0]["fingerprint"] == summary["fingerprint"]


async def test_replay_after_the_fix_sends_once_even_when_replayed_twice(
    stack: Stack, archiver: httpx.AsyncClient, smtp_sink: SmtpSink
) -> None:
    smtp_sink.fail_next(1, 550, "5.1.1 mailbox unavailable")
    await stack.register("grace@example.com")
    [summary] = await wait_records(archiver, 1)
    # the fault is gone now: the switch was for one delivery
    first = await archiver.post(f"/v1/dead-letters/{summary['id']}/replay", headers=ADMIN)
    assert first.status_code == 202, first.text
    await eventually(lambda: len(smtp_sink.messages) == 1, what="the replayed welcome")
    second = await archiver.post(f"/v1/dead-letters/{summary['id']}/replay", headers=ADMIN)
    assert second.status_code == 202
    await stack.consumed("duplicate", 1)  # the second replay reached the notifier, skipped
    assert len(smtp_sink.messages) == 1  # the notifier's idempotency: sent once
    record = (await archiver.get(f"/v1/dead-letters/{summary['id']}")).json()
    assert record["status"] == "replayed"
    assert len(record["replays"]) == 2
    assert len(await records(archiver)) == 1  # no new dead letter


async def test_a_replay_that_fails_again_comes_back_linked(
    stack: Stack, archiver: httpx.AsyncClient, smtp_sink: SmtpSink
) -> None:
    smtp_sink.fail_next(2, 550, "5.1.1 mailbox unavailable")
    await stack.register("grace@example.com")
    [original] = await wait_records(archiver, 1)
    assert (
        await archiver.post(f"/v1/dead-letters/{original['id']}/replay", headers=ADMIN)
    ).status_code == 202
    items = await wait_records(archiver, 2)
    again = next(i for i in items if i["id"] != original["id"])
    assert again["replay_of"] == original["id"]

    # The new record is listed as soon as it is stored; the link to the original follows.
    async def linked() -> bool:
        record = (await archiver.get(f"/v1/dead-letters/{original['id']}")).json()
        return bool(record["replay_failures"])

    await eventually(linked, what="the failed replay linked to its record")
    record = (await archiver.get(f"/v1/dead-letters/{original['id']}")).json()
    assert record["status"] == "replay-failed"
    assert record["replay_failures"] == [again["id"]]


async def test_the_same_dead_letter_twice_is_one_record(
    archiver: httpx.AsyncClient, amqp_url: str
) -> None:
    connection = await AmqpConnection(amqp_url, client_name="test").connect()
    try:
        channel = await connection.channel()
        dlx = await channel.get_exchange("courier.dlx")
        for _ in range(2):
            await dlx.publish(
                aio_pika.Message(
                    b"\xff\xfe not utf-8",
                    message_id="dup-1",
                    content_type="application/octet-stream",
                    headers={
                        "x-courier-failure-reason": "body is not UTF-8 text (byte 0)",
                        "x-courier-failure-kind": "undecodable",
                        "x-courier-original-queue": USER_EVENTS_QUEUE,
                        "x-courier-original-exchange": "courier.events",
                        "x-courier-original-routing-key": "user.registered",
                    },
                ),
                routing_key="user.registered",
            )
    finally:
        await connection.close()
    await wait_records(archiver, 1)

    async def both_seen() -> bool:  # the second copy was read too, and recognised
        metrics = (await archiver.get("/metrics")).text
        return "courier_dead_letters_duplicate_total 1.0" in metrics

    await eventually(both_seen, what="the second copy, counted as a duplicate")
    [only] = await records(archiver)
    record = (await archiver.get(f"/v1/dead-letters/{only['id']}")).json()
    assert record["body"] is None  # not text: kept byte for byte
    assert record["body_b64"] == "//4gbm90IHV0Zi04"


async def test_changes_need_the_admin_token(
    stack: Stack, archiver: httpx.AsyncClient, smtp_sink: SmtpSink
) -> None:
    smtp_sink.fail_next(1, 550, "no")
    await stack.register("ada@example.com")
    [summary] = await wait_records(archiver, 1)
    url = f"/v1/dead-letters/{summary['id']}"
    for method, path in (
        ("POST", url + "/replay"),
        ("DELETE", url),
        ("DELETE", "/v1/dead-letters?all=true"),
        ("POST", "/v1/dead-letters/replay"),
    ):
        missing = await archiver.request(method, path, json={"queue": "q"})
        assert missing.status_code == 401, (method, path)
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = await archiver.request(
            method, path, json={"queue": "q"}, headers={"Authorization": "Bearer nope"}
        )
        assert wrong.status_code == 403, (method, path)
    assert (await archiver.get(url, params={"reveal": "true"})).status_code == 401
    assert (await archiver.delete(url, headers=ADMIN)).status_code == 204
    assert await records(archiver) == []
    assert (await archiver.get("/v1/audit")).status_code == 401
    trail = (await archiver.get("/v1/audit", headers=ADMIN)).json()
    assert [(e["action"], e["count"]) for e in trail] == [("delete", "1")]
    assert summary["id"] in trail[0]["what"]


async def test_user_deleted_erases_their_dead_letters(
    stack: Stack, archiver: httpx.AsyncClient, smtp_sink: SmtpSink
) -> None:
    smtp_sink.fail_next(1, 550, "5.1.1 <ada@example.com> unknown")
    user = await stack.register("ada@example.com", display_name="Ada Lovelace")
    [summary] = await wait_records(archiver, 1)
    assert (await stack.users.delete(f"/v1/users/{user['id']}")).status_code == 204

    async def erased() -> bool:
        record = (
            await archiver.get(
                f"/v1/dead-letters/{summary['id']}", params={"reveal": "true"}, headers=ADMIN
            )
        ).json()
        return bool(record["erased"])

    await eventually(erased, timeout=20, what="the record to be erased")
    revealed = (
        await archiver.get(
            f"/v1/dead-letters/{summary['id']}", params={"reveal": "true"}, headers=ADMIN
        )
    ).text
    assert "ada@example.com" not in revealed
    assert "Ada Lovelace" not in revealed
    refused = await archiver.post(f"/v1/dead-letters/{summary['id']}/replay", headers=ADMIN)
    assert refused.status_code == 409
