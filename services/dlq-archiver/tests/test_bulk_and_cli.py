"""Bulk replay halts on its canary while the fault persists; the CLI against a live archiver."""

from __future__ import annotations

import asyncio

import httpx

from courier_sinks.smtp import SmtpSink
from courier_testing.polling import eventually
from notification_service.routes import USER_EVENTS_QUEUE
from tests.support.archiver import ADMIN, StartArchiver, courier_dlq, records, wait_records
from tests.support.stack import Stack


async def test_bulk_replay_halts_after_a_failing_canary(
    stack: Stack, archiver: httpx.AsyncClient, smtp_sink: SmtpSink
) -> None:
    smtp_sink.fail_next(100_000, 550, "5.7.1 relay denied")  # the fault persists
    await asyncio.gather(*(stack.register(f"u{i}@example.com") for i in range(200)))
    dead = await wait_records(archiver, 200, timeout=60)
    fingerprint = dead[0]["fingerprint"]

    job = await archiver.post(
        "/v1/dead-letters/replay",
        json={"fingerprint": fingerprint, "canary": 10, "canary_wait_seconds": 10},
        headers=ADMIN,
    )
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    assert job.json()["total"] == 200

    async def finished() -> bool:
        state = (await archiver.get(f"/v1/replays/{job_id}")).json()
        return bool(state["status"] != "running")

    await eventually(finished, timeout=30, what="the job to stop")
    state = (await archiver.get(f"/v1/replays/{job_id}")).json()
    assert state["status"] == "halted"
    assert state["replayed"] == 10
    assert "canary" in state["reason"]

    # The job halts as soon as the canary has clearly failed; the rest of its replays are
    # still on their way back through the dead-letter queue, and are linked as they arrive.
    async def canary_linked() -> bool:
        state = (await archiver.get(f"/v1/replays/{job_id}")).json()
        return bool(state["failed_again"] == 10)

    await eventually(canary_linked, timeout=30, what="every canary replay to come back linked")
    state = (await archiver.get(f"/v1/replays/{job_id}")).json()
    assert state["status"] == "halted"
    assert state["replayed"] == 10  # nothing replayed after the halt
    dead_now = await records(archiver, fingerprint=fingerprint, status="dead")
    untouched = [r for r in dead_now if r["replay_of"] is None]
    assert len(untouched) == 190  # never replayed, still listed
    died_again = [r for r in dead_now if r["replay_of"] is not None]
    assert len(died_again) == 10  # the canary's replays, each linked to its record
    replay_failed = await records(archiver, status="replay-failed")
    assert {r["id"] for r in replay_failed} == {r["replay_of"] for r in died_again}
    assert smtp_sink.messages == []
    trail = (await archiver.get("/v1/audit", headers=ADMIN)).json()
    assert [e["action"] for e in trail][:2] == ["bulk_replay_halted", "bulk_replay_started"]


async def test_cli_lists_shows_and_replays(
    stack: Stack,
    smtp_sink: SmtpSink,
    start_archiver: StartArchiver,
) -> None:
    archiver = start_archiver()
    smtp_sink.fail_next(1, 550, "5.1.1 <ada@example.com> unknown")
    await stack.register("ada@example.com")

    async def archived() -> bool:
        listing = await asyncio.to_thread(courier_dlq, archiver.url, "list")
        return USER_EVENTS_QUEUE in listing.stdout

    await eventually(archived, timeout=30, what="the CLI to list the dead letter")
    listing = await asyncio.to_thread(courier_dlq, archiver.url, "list")
    assert listing.returncode == 0, listing.stderr
    assert "ada@example.com" not in listing.stdout
    record_id = listing.stdout.split()[0]

    shown = await asyncio.to_thread(courier_dlq, archiver.url, "show", record_id)
    assert shown.returncode == 0
    assert '"reason_class": "permanent"' in shown.stdout
    groups = await asyncio.to_thread(courier_dlq, archiver.url, "groups")
    assert "user.registered" in groups.stdout

    refused = await asyncio.to_thread(
        courier_dlq, archiver.url, "replay", record_id, token="wrong-token"
    )
    assert refused.returncode == 1
    assert "403" in refused.stderr
    replayed = await asyncio.to_thread(courier_dlq, archiver.url, "replay", record_id)
    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed {record_id}" in replayed.stdout
    await eventually(lambda: len(smtp_sink.messages) == 1, what="the replayed welcome")
    purged = await asyncio.to_thread(courier_dlq, archiver.url, "purge", "--all", "--yes")
    assert purged.stdout.strip() == "purged 1"
