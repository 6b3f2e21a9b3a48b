"""Bulk replay in ramped batches, cancelled mid-way, and warning of new failures, on the API.

Real dead letters: users registered while the SMTP sink refuses mail, replayed once it
accepts again (or while it still refuses, where that is the point).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from courier_sinks.smtp import SmtpSink
from courier_testing.polling import eventually
from tests.support.archiver import ADMIN, records, wait_records
from tests.support.stack import Stack

REFUSED = (550, "5.7.1 relay denied")


async def failing_group(
    stack: Stack, archiver: httpx.AsyncClient, smtp_sink: SmtpSink, count: int, *, prefix: str
) -> str:
    """``count`` dead letters of one group; the provider is fixed afterwards. Its fingerprint."""
    smtp_sink.fail_next(count, *REFUSED)
    await asyncio.gather(*(stack.register(f"{prefix}{i}@example.com") for i in range(count)))
    dead = await wait_records(archiver, count, timeout=60)
    assert len({r["fingerprint"] for r in dead}) == 1
    return str(dead[0]["fingerprint"])


async def job(archiver: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await archiver.get(f"/v1/replays/{job_id}")
    assert response.status_code == 200, response.text
    state: dict[str, Any] = response.json()
    return state


async def follow(
    archiver: httpx.AsyncClient, job_id: str, *, timeout: float = 60
) -> tuple[dict[str, Any], list[tuple[int, str, int]]]:
    """Poll the job until it ends: its last state and every (batch, phase, replayed) seen."""
    seen: list[tuple[int, str, int]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = await job(archiver, job_id)
        step = (state["batch"], state["phase"], state["replayed"])
        if not seen or seen[-1] != step:
            seen.append(step)
        if state["status"] != "running":
            return state, seen
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} still running after {timeout}s: {seen}")


async def test_a_ramped_replay_goes_batch_by_batch_and_sends_each_welcome_once(
    stack: Stack, archiver: httpx.AsyncClient, smtp_sink: SmtpSink
) -> None:
    fingerprint = await failing_group(stack, archiver, smtp_sink, 30, prefix="ramp")
    started = time.monotonic()
    response = await archiver.post(
        "/v1/dead-letters/replay",
        json={"fingerprint": fingerprint, "canary": 0, "ramp": [1, 2, 5], "canary_wait_seconds": 1},
        headers=ADMIN,
    )
    assert response.status_code == 202, response.text
    assert response.json()["batches"] == [1, 2, 5, 22]

    state, seen = await follow(archiver, response.json()["id"])
    assert state["status"] == "completed", state
    assert state["replayed"] == 30
    # Each batch was watched, with what came before it replayed and nothing more.
    watches = [(batch, replayed) for batch, phase, replayed in seen if phase == "watching"]
    assert watches == [(1, 1), (2, 3), (3, 8)], seen
    assert time.monotonic() - started >= 3  # three watches of a second each
    await eventually(lambda: len(smtp_sink.messages) == 30, timeout=30, what="30 welcomes")
    await asyncio.sleep(1)
    recipients = sorted(r for m in smtp_sink.messages for r in m["rcpt_tos"])
    assert recipients == sorted(f"ramp{i}@example.com" for i in range(30))  # each once


async def test_a_failure_in_a_batch_stops_the_ramp_before_the_next(
    stack: Stack, archiver: httpx.AsyncClient, smtp_sink: SmtpSink
) -> None:
    fingerprint = await failing_group(stack, archiver, smtp_sink, 20, prefix="halt")
    response = await archiver.post(
        "/v1/dead-letters/replay",
        json={"fingerprint": fingerprint, "canary": 0, "ramp": [1, 2, 5], "canary_wait_seconds": 3},
        headers=ADMIN,
    )
    job_id = response.json()["id"]
    # Batch 1 goes through; then the provider breaks again, before batch 2 is sent.
    await eventually(lambda: len(smtp_sink.messages) == 1, timeout=10, what="batch 1's welcome")
    smtp_sink.fail_next(100_000, *REFUSED)

    state, _ = await follow(archiver, job_id)
    assert state["status"] == "halted", state
    assert state["replayed"] == 3  # batches 1 and 2: batch 3 never started
    assert "batch 2" in state["reason"]
    untouched = [r for r in await records(archiver, fingerprint=fingerprint) if not r["replay_of"]]
    assert sum(r["status"] == "dead" for r in untouched) == 17


async def test_a_cancelled_job_stops_between_two_replays_and_leaves_the_rest_untouched(
    stack: Stack, archiver: httpx.AsyncClient, smtp_sink: SmtpSink
) -> None:
    fingerprint = await failing_group(stack, archiver, smtp_sink, 30, prefix="cancel")
    response = await archiver.post(
        "/v1/dead-letters/replay",
        json={"fingerprint": fingerprint, "canary": 0, "rate_per_second": 4},
        headers=ADMIN,
    )
    job_id = response.json()["id"]
    await eventually(lambda: _replayed_at_least(archiver, job_id, 3), timeout=20, what="3 replays")

    refused = await archiver.post(f"/v1/replays/{job_id}/cancel")
    assert refused.status_code == 401
    assert (await job(archiver, job_id))["status"] == "running"
    cancel = await archiver.post(f"/v1/replays/{job_id}/cancel", headers=ADMIN)
    assert cancel.status_code == 202, cancel.text
    assert cancel.json()["cancel_requested"] is True

    state, _ = await follow(archiver, job_id, timeout=5)
    assert state["status"] == "cancelled"
    replayed = state["replayed"]
    assert 3 <= replayed < 30
    await asyncio.sleep(1.5)
    assert (await job(archiver, job_id))["replayed"] == replayed  # nothing after the cancel
    await eventually(lambda: len(smtp_sink.messages) == replayed, what="the replayed welcomes")
    left = await records(archiver, fingerprint=fingerprint, status="dead")
    assert len(left) == 30 - replayed
    assert all(r["replay_of"] is None for r in left)

    again = await archiver.post(f"/v1/replays/{job_id}/cancel", headers=ADMIN)
    assert again.status_code == 409
    unknown = "0190a000-0000-7000-8000-000000000000"
    assert (await archiver.post(f"/v1/replays/{unknown}/cancel", headers=ADMIN)).status_code == 404
    trail = [e["action"] for e in (await archiver.get("/v1/audit", headers=ADMIN)).json()]
    assert trail[:2] == ["bulk_replay_cancelled", "bulk_replay_cancel_requested"]
    listed = (await archiver.get("/v1/replays")).json()
    assert [j["id"] for j in listed][:1] == [job_id]


async def _replayed_at_least(archiver: httpx.AsyncClient, job_id: str, count: int) -> bool:
    return bool((await job(archiver, job_id))["replayed"] >= count)


async def test_the_job_counts_new_dead_letters_joining_its_group_but_not_its_own(
    stack: Stack, archiver: httpx.AsyncClient, smtp_sink: SmtpSink
) -> None:
    fingerprint = await failing_group(stack, archiver, smtp_sink, 10, prefix="old")
    smtp_sink.fail_next(100_000, *REFUSED)  # not fixed after all
    response = await archiver.post(
        "/v1/dead-letters/replay",
        json={
            "fingerprint": fingerprint,
            "canary": 0,
            "rate_per_second": 2,
            "max_failure_rate": 1,  # keep going: this test watches, it does not halt
        },
        headers=ADMIN,
    )
    job_id = response.json()["id"]
    assert response.json()["new_failures"] == 0
    assert response.json()["group_at_start"]["count"] == 10
    # Fresh traffic fails the same way while the job runs.
    await asyncio.gather(*(stack.register(f"new{i}@example.com") for i in range(3)))

    async def three_new() -> bool:
        state = await job(archiver, job_id)
        return bool(state["new_failures"] == 3 and state["failed_again"] >= 1)

    await eventually(three_new, timeout=30, what="3 new failures beside the job's own")
    state, _ = await follow(archiver, job_id)
    await eventually(
        lambda: _failed_again(archiver, job_id, 10), timeout=30, what="every replay back"
    )
    assert (await job(archiver, job_id))["new_failures"] == 3  # its own failures are not new
    assert state["status"] == "completed"


async def _failed_again(archiver: httpx.AsyncClient, job_id: str, count: int) -> bool:
    return bool((await job(archiver, job_id))["failed_again"] == count)
