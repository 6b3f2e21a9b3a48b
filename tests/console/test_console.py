"""The dead-letter console in chromium, with real dead letters: what an operator sees and does.

The screenshots the README shows are taken here (`COURIER_CONSOLE_SCREENSHOTS=1` writes them
to docs/console/).
"""

from __future__ import annotations

import asyncio
import time

import httpx
from playwright.async_api import Dialog

from courier_sinks.smtp import SmtpSink
from courier_testing.polling import eventually
from notification_service.routes import USER_EVENTS_QUEUE
from tests.console.browser import Console, failing_group, foreign_dead_letter
from tests.support.archiver import ADMIN, records
from tests.support.stack import Stack


async def test_the_groups_page_lists_failing_groups_masked_latest_first_and_refreshes_itself(
    console: Console, stack: Stack, api: httpx.AsyncClient, smtp_sink: SmtpSink, amqp_url: str
) -> None:
    emails = [f"grace{i}@example.com" for i in range(3)]
    fingerprint = await failing_group(stack, api, smtp_sink, emails)
    # Then another team's consumer fails, and its reason names a person.
    await foreign_dead_letter(
        amqp_url, queue="billing.invoices", reason="SMTP 550: <grace.hopper@example.com> unknown"
    )
    await eventually(lambda: _groups(api, 2), timeout=30, what="the second group")

    await console.open()
    row = console.page.locator(f'tr[data-fingerprint="{fingerprint}"]')
    await row.wait_for()
    cells = await row.locator("td").all_inner_texts()
    assert cells[0] == fingerprint
    assert cells[1:4] == [USER_EVENTS_QUEUE, "user.registered", "3"]
    assert cells[4].endswith("UTC")  # first seen
    assert cells[5].endswith("UTC")  # last seen
    assert "relay denied" in cells[6]  # the sample reason
    queues = await console.page.locator(
        "tbody tr[data-fingerprint] td:nth-child(2)"
    ).all_inner_texts()
    assert queues == ["billing.invoices", USER_EVENTS_QUEUE]  # the latest failure first
    text = await console.text()
    assert "unknown" in text
    assert "grace.hopper@example.com" not in text  # masked as the API masks dead letters
    assert "@example.com" not in await console.page.content()
    await console.screenshot("groups")

    # Two more fail while the page is open: it shows them without a reload, on top.
    await failing_group(stack, api, smtp_sink, ["late0@example.com", "late1@example.com"])
    await row.locator("td.num").filter(has_text="5").wait_for(timeout=15_000)
    first = console.page.locator("tbody tr[data-fingerprint]").first
    assert await first.get_attribute("data-fingerprint") == fingerprint


async def _groups(api: httpx.AsyncClient, count: int) -> bool:
    return len((await api.get("/v1/dead-letters/groups")).json()) == count


async def test_the_detail_shows_no_email_in_clear_until_revealed_with_confirmation(
    console: Console, stack: Stack, api: httpx.AsyncClient, smtp_sink: SmtpSink
) -> None:
    email = "ada.lovelace@example.com"
    reason = (550, f"5.1.1 <{email}>: mailbox unavailable")
    fingerprint = await failing_group(stack, api, smtp_sink, [email], reason)

    await console.open()
    await console.page.click(f"text={fingerprint}")  # the group's dead letters
    record_id = (await records(api))[0]["id"]
    await console.page.click(f"text={record_id}")
    await console.page.wait_for_selector("text=Diagnosis")
    text = await console.text()
    for shown in ("permanent", USER_EVENTS_QUEUE, "courier.events", "user.registered"):
        assert shown in text  # diagnosis and route
    trace_id = (await api.get(f"/v1/dead-letters/{record_id}")).json()["trace_id"]
    assert trace_id
    assert trace_id in text
    assert email not in text
    assert email not in await console.page.content()  # not even hidden in the markup
    await console.screenshot("detail")

    await console.use_token()
    console.page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.dismiss()))
    await console.page.click("#reveal")
    await asyncio.sleep(0.5)
    assert email not in await console.text()  # dismissed: nothing revealed, nothing audited
    trail = (await api.get("/v1/audit", headers=ADMIN)).json()
    assert "reveal" not in [e["action"] for e in trail]

    messages: list[str] = []

    async def accept(dialog: Dialog) -> None:
        messages.append(dialog.message)
        await dialog.accept()

    console.page.once("dialog", lambda dialog: asyncio.ensure_future(accept(dialog)))
    await console.page.click("#reveal")
    await console.page.wait_for_selector("text=Revealed: personal data in clear")
    assert email in await console.text()
    assert "audit" in messages[0]
    trail = (await api.get("/v1/audit", headers=ADMIN)).json()
    assert trail[0]["action"] == "reveal"
    assert record_id in trail[0]["what"]

    # The provider works again: replay this one.
    console.page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await console.page.click("#replay-one")
    await console.page.locator("#message").filter(has_text="Replayed as single.").wait_for()
    await console.page.locator(".badge.replayed").wait_for()
    await eventually(lambda: len(smtp_sink.messages) == 1, what="the welcome")
    assert smtp_sink.messages[0]["rcpt_tos"] == [email]
    assert email not in await console.text()  # masked again after the replay


async def batch_states(console: Console) -> list[str]:
    states: list[str] = await console.page.locator("#batches li").evaluate_all(
        "items => items.map(li => li.dataset.state)"
    )
    return states


async def test_a_ramped_replay_of_40_shows_its_batches_and_sends_40_welcomes_once(
    console: Console, stack: Stack, api: httpx.AsyncClient, smtp_sink: SmtpSink
) -> None:
    emails = [f"ramp{i}@example.com" for i in range(40)]
    fingerprint = await failing_group(stack, api, smtp_sink, emails)  # the provider is fixed

    # The group's dead letters, 15 a page.
    await console.open(f"#/dead-letters?fingerprint={fingerprint}&limit=15")
    pages: list[list[str]] = []
    while True:
        await console.page.wait_for_selector("tbody tr")
        ids = await console.page.locator("tbody tr td:first-child").all_inner_texts()
        if pages and ids == pages[-1]:
            await asyncio.sleep(0.1)  # the next page is still coming
            continue
        pages.append(ids)
        following = console.page.locator("text=Next page »")
        if not await following.count():
            break
        await following.click()
    assert [len(p) for p in pages] == [15, 15, 10]
    assert len({i for p in pages for i in p}) == 40
    assert "@example.com" not in await console.page.content()

    await console.go("#/groups")
    await console.use_token()
    await console.page.locator(f'tr[data-fingerprint="{fingerprint}"] >> text=Replay…').click()
    await console.page.fill("input[name=canary]", "0")
    await console.page.fill("input[name=ramp]", "1,2,5,20")
    await console.page.fill("input[name=canary_wait_seconds]", "1.5")
    await console.page.fill("input[name=rate_per_second]", "20")
    await console.page.click("#start-job")
    await console.page.wait_for_selector("#batches li")
    assert await console.page.locator("#batches li").count() == 5  # 1, 2, 5, 20, the rest

    seen: list[list[str]] = []
    screenshot_taken = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = await batch_states(console)
        if not seen or seen[-1] != states:
            seen.append(states)
        if not screenshot_taken and states[:3] == ["done", "done", "watching"]:
            await console.screenshot("job")
            screenshot_taken = True
        if all(s == "done" for s in states):
            break
        await asyncio.sleep(0.1)
    await console.page.locator(".badge.completed").first.wait_for()
    # Batch by batch: each watched while the next waits.
    for n in range(4):
        watching = ["done"] * n + ["watching"] + ["pending"] * (4 - n)
        assert watching in seen, seen
    assert screenshot_taken
    assert "40 of 40 replayed · 0 failed again" in await console.text()
    await console.go(f"#/dead-letters?fingerprint={fingerprint}")
    await console.page.select_option("select[name=status]", "replayed")
    await console.page.click("text=Filter")
    await console.page.wait_for_function(
        "() => document.querySelectorAll('tbody .badge.replayed').length === 40"
    )

    await eventually(lambda: len(smtp_sink.messages) == 40, timeout=30, what="40 welcomes")
    await asyncio.sleep(1)  # a duplicate would have arrived by now
    recipients = sorted(r for m in smtp_sink.messages for r in m["rcpt_tos"])
    assert recipients == sorted(emails)  # 40 welcomes, each sent once


async def test_a_cancelled_job_leaves_the_rest_untouched(
    console: Console, stack: Stack, api: httpx.AsyncClient, smtp_sink: SmtpSink
) -> None:
    emails = [f"stop{i}@example.com" for i in range(30)]
    fingerprint = await failing_group(stack, api, smtp_sink, emails)

    await console.open()
    await console.use_token()
    await console.go(f"#/replay?fingerprint={fingerprint}")
    await console.page.fill("input[name=ramp]", "")
    await console.page.fill("input[name=rate_per_second]", "3")
    await console.page.click("#start-job")
    await console.page.wait_for_selector("#cancel-job")

    async def some_replayed() -> bool:
        value = await console.page.get_attribute("#progress", "value")
        return int(value or 0) >= 3

    await eventually(some_replayed, timeout=20, what="3 replays on the page")
    console.page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await console.page.click("#cancel-job")
    await console.page.locator(".badge.cancelled").wait_for()
    assert await console.page.locator("#cancel-job").count() == 0

    job_id = console.page.url.rsplit("/", 1)[1]
    replayed = (await api.get(f"/v1/replays/{job_id}")).json()["replayed"]
    assert 3 <= replayed < 30
    assert f"{replayed} of 30 replayed" in await console.text()
    await asyncio.sleep(1.5)
    assert (await api.get(f"/v1/replays/{job_id}")).json()["replayed"] == replayed
    await eventually(lambda: len(smtp_sink.messages) == replayed, what="the replayed welcomes")
    untouched = await records(api, fingerprint=fingerprint, status="dead")
    assert len(untouched) == 30 - replayed
    assert all(not r["replay_of"] for r in untouched)
    assert len(smtp_sink.messages) == replayed


async def test_without_the_token_every_action_is_refused_and_the_page_says_so(
    console: Console, stack: Stack, api: httpx.AsyncClient, smtp_sink: SmtpSink
) -> None:
    emails = ["nobody@example.com", "noone@example.com"]
    fingerprint = await failing_group(stack, api, smtp_sink, emails)
    record_id = (await records(api))[0]["id"]
    console.page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await console.open(f"#/dead-letter/{record_id}")
    await console.page.wait_for_selector("text=No admin token")
    refusal = console.page.locator("#message")

    for button in ("#replay-one", "#reveal", "#delete-one"):
        await console.page.click(button)
        await refusal.filter(has_text="401 Authentication required").wait_for()
        await console.go(f"#/dead-letter/{record_id}")
    await console.go(f"#/replay?fingerprint={fingerprint}")
    await console.page.click("#start-job")
    await refusal.filter(has_text="401 Authentication required").wait_for()
    await console.go(f"#/purge?fingerprint={fingerprint}")
    await console.page.fill("#purge-confirm", "purge")
    await console.page.click("#purge")
    await refusal.filter(has_text="401 Authentication required").wait_for()
    await console.go("#/audit")
    await console.page.locator("#view-error").filter(has_text="401").wait_for()
    record = (await api.get(f"/v1/dead-letters/{record_id}")).json()
    assert record["status"] == "dead"  # nothing changed
    assert record["replays"] == []
    assert smtp_sink.messages == []

    # A job an operator with the token started (its canary, then a long watch): no cancel.
    started = await api.post(
        "/v1/dead-letters/replay",
        json={"fingerprint": fingerprint, "canary": 1, "canary_wait_seconds": 60},
        headers=ADMIN,
    )
    job_id = started.json()["id"]
    await console.go(f"#/job/{job_id}")
    await console.page.click("#cancel-job")
    await refusal.filter(has_text="401 Authentication required").wait_for()
    assert (await api.get(f"/v1/replays/{job_id}")).json()["status"] == "running"
    cancelled = await api.post(f"/v1/replays/{job_id}/cancel", headers=ADMIN)
    assert cancelled.status_code == 202

    # The API refuses the same without the token.
    calls = [
        ("POST", f"/v1/dead-letters/{record_id}/replay"),
        ("GET", f"/v1/dead-letters/{record_id}?reveal=true"),
        ("DELETE", f"/v1/dead-letters/{record_id}"),
        ("DELETE", f"/v1/dead-letters?fingerprint={fingerprint}"),
        ("POST", "/v1/dead-letters/replay"),
        ("POST", f"/v1/replays/{job_id}/cancel"),
        ("GET", "/v1/audit"),
    ]
    for method, path in calls:
        body = {"fingerprint": fingerprint} if path == "/v1/dead-letters/replay" else None
        response = await api.request(method, path, json=body)
        assert response.status_code == 401, (method, path, response.status_code)
    assert await console.context.cookies() == []  # the token never became a cookie

    # Entered once, the token serves the whole tab, and only that tab.
    await console.use_token()
    await console.go("#/audit")
    await console.page.wait_for_selector("text=bulk_replay_cancel_requested")
    other = await console.context.new_page()
    await other.goto(f"{console.url}/console#/audit")
    await other.wait_for_selector("text=No admin token")
    await other.close()

    # With it, the purge still asks for the word before it deletes.
    await console.go(f"#/purge?fingerprint={fingerprint}")
    await console.page.fill("#purge-confirm", "purg")
    assert await console.page.is_disabled("#purge")
    await console.page.fill("#purge-confirm", "purge")
    await console.page.click("#purge")
    await console.page.wait_for_selector("text=2 dead letters deleted (audited).")
    assert await records(api) == []
    await console.go("#/audit")
    await console.page.locator("td", has_text="purge").first.wait_for()


async def test_new_dead_letters_joining_the_group_while_its_job_runs_show_a_warning(
    console: Console, stack: Stack, api: httpx.AsyncClient, smtp_sink: SmtpSink
) -> None:
    emails = [f"wave{i}@example.com" for i in range(10)]
    fingerprint = await failing_group(stack, api, smtp_sink, emails)

    await console.open()
    await console.use_token()
    await console.go(f"#/replay?fingerprint={fingerprint}")
    await console.page.fill("input[name=canary]", "1")  # then a long watch: the job waits
    await console.page.fill("input[name=ramp]", "")
    await console.page.fill("input[name=canary_wait_seconds]", "60")
    await console.page.click("#start-job")
    await console.page.locator('#batches li[data-state="watching"]').wait_for()
    assert await console.page.locator("#new-failures").count() == 0

    # The provider fails again for fresh traffic of the same kind.
    await failing_group(stack, api, smtp_sink, ["fresh0@example.com", "fresh1@example.com"])
    warning = console.page.locator("#new-failures")
    await warning.wait_for(timeout=15_000)
    text = await warning.inner_text()
    assert "New failures: 2 new dead letters have joined this job's filter" in text
    await console.screenshot("job-new-failures")
    console.page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await console.page.click("#cancel-job")
    await console.page.locator(".badge.cancelled").wait_for()
    assert await warning.is_visible()  # the warning stays with the job
