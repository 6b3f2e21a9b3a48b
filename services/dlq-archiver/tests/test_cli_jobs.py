"""``courier-dlq`` runs a ramped replay, lists jobs, warns of new failures and cancels."""

from __future__ import annotations

import asyncio
import re

import httpx

from courier_sinks.smtp import SmtpSink
from courier_testing.polling import eventually
from tests.support.archiver import StartArchiver, courier_dlq, records
from tests.support.stack import Stack

REFUSED = (550, "5.7.1 relay denied")


async def test_cli_ramps_follows_warns_and_cancels(
    stack: Stack,
    smtp_sink: SmtpSink,
    start_archiver: StartArchiver,
) -> None:
    archiver = start_archiver()
    api = httpx.AsyncClient(base_url=archiver.url)
    smtp_sink.fail_next(12, *REFUSED)
    await asyncio.gather(*(stack.register(f"cli{i}@example.com") for i in range(12)))

    async def archived(count: int) -> bool:
        return len(await records(api, status="dead")) == count

    await eventually(lambda: archived(12), timeout=60, what="12 dead letters")
    fingerprint = (await records(api))[0]["fingerprint"]

    ramped = await asyncio.to_thread(
        courier_dlq, archiver.url, "replay", "--fingerprint", fingerprint, "--canary", "0",
        "--ramp", "1,2", "--canary-wait", "0.5",
    )  # fmt: skip
    assert ramped.returncode == 0, ramped.stderr
    assert "12 dead letters in batches 1 + 2 + 9" in ramped.stdout
    assert "batch 1/3 (1): watching, 1/12 replayed" in ramped.stdout
    assert "batch 2/3 (2): watching, 3/12 replayed" in ramped.stdout
    assert "completed: 12 replayed, 0 failed again" in ramped.stdout
    await eventually(lambda: len(smtp_sink.messages) == 12, timeout=30, what="12 welcomes")

    # A second outage; its replay job waits on its canary while fresh mail fails again.
    smtp_sink.fail_next(10, *REFUSED)
    await asyncio.gather(*(stack.register(f"again{i}@example.com") for i in range(10)))
    await eventually(lambda: archived(10), timeout=60, what="10 new dead letters")
    started = await asyncio.to_thread(
        courier_dlq, archiver.url, "replay", "--fingerprint", fingerprint, "--canary", "1",
        "--canary-wait", "60", "--no-wait",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    match = re.search(r"replay job (\S+): 10 dead letters in batches 1 \+ 9", started.stdout)
    assert match, started.stdout
    job_id = match.group(1)
    await eventually(lambda: len(smtp_sink.messages) == 13, timeout=30, what="the canary")
    smtp_sink.fail_next(2, *REFUSED)
    await asyncio.gather(stack.register("late0@example.com"), stack.register("late1@example.com"))

    async def warned() -> bool:
        listing = await asyncio.to_thread(courier_dlq, archiver.url, "jobs")
        return f"{job_id}  running" in listing.stdout and "new failures 2" in listing.stdout

    await eventually(warned, timeout=30, what="`courier-dlq jobs` to show 2 new failures")
    refused = await asyncio.to_thread(courier_dlq, archiver.url, "cancel", job_id, token=None)
    assert refused.returncode == 1
    assert "401" in refused.stderr
    cancelled = await asyncio.to_thread(courier_dlq, archiver.url, "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == "cancelled: 1 of 10 replayed, 9 left untouched"
    followed = await asyncio.to_thread(courier_dlq, archiver.url, "job", job_id, "--wait")
    assert followed.returncode == 2
    assert "warning: 2 new dead letter(s) joined this filter" in followed.stderr
    assert followed.stdout.startswith("cancelled: 1 replayed")
    assert len(await records(api, fingerprint=fingerprint, status="dead")) == 9 + 2
    await api.aclose()
