"""``courier-dlq``: the operator's command line for the archiver's HTTP API.

    courier-dlq list [--queue Q] [--event-type T] [--fingerprint F] [--limit N]
    courier-dlq show ID [--reveal]
    courier-dlq groups
    courier-dlq replay ID
    courier-dlq replay --queue Q | --fingerprint F [--canary N] [--ramp 1,2,5,20] [--rate R]
    courier-dlq jobs
    courier-dlq job JOB_ID [--wait]
    courier-dlq cancel JOB_ID
    courier-dlq purge ID | --queue Q | --fingerprint F | --all

``COURIER_DLQ_URL`` (default http://127.0.0.1:8002) and ``COURIER_ADMIN_TOKEN`` configure it.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click
import httpx


class Api:
    def __init__(self, url: str, token: str | None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=30)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise click.ClickException(f"cannot reach the archiver: {exc}") from None
        if response.status_code >= 400:
            try:
                problem = response.json()
                message = f"{problem.get('title')}: {problem.get('detail') or ''}".strip(": ")
            except ValueError:
                message = response.text[:200]
            raise click.ClickException(f"{response.status_code} {message}")
        return response.json() if response.content else None


pass_api = click.make_pass_decorator(Api)


@click.group()
@click.option("--url", envvar="COURIER_DLQ_URL", default="http://127.0.0.1:8002", show_default=True)
@click.option("--token", envvar="COURIER_ADMIN_TOKEN", help="Admin bearer token.")
@click.pass_context
def main(ctx: click.Context, url: str, token: str | None) -> None:
    """Inspect, group, replay and purge Courier's dead letters."""
    ctx.obj = Api(url, token)


def _filters(**values: str | None) -> dict[str, str]:
    return {k: v for k, v in values.items() if v}


@main.command("list")
@click.option("--queue")
@click.option("--event-type")
@click.option("--fingerprint")
@click.option("--status", type=click.Choice(["dead", "replayed", "replay-failed"]))
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_api
def list_(
    api: Api,
    queue: str | None,
    event_type: str | None,
    fingerprint: str | None,
    status: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List dead letters, newest first (emails and phones masked)."""
    params = _filters(
        queue=queue, event_type=event_type, fingerprint=fingerprint, status=status
    ) | {"limit": str(limit)}
    page = api.call("GET", "/v1/dead-letters", params=params)
    if as_json:
        click.echo(json.dumps(page, indent=2))
        return
    for item in page["items"]:
        click.echo(
            f"{item['id']}  {item['archived_at'][:19]}  {item['status']:<13} "
            f"{item['source_queue']}  {item['event_type'] or '-'}  {item['reason'][:80]}"
        )
    click.echo(f"{len(page['items'])} shown" + (", more available" if page["next_cursor"] else ""))


@main.command()
@click.argument("record_id")
@click.option("--reveal", is_flag=True, help="Unmasked (needs the token; audited).")
@pass_api
def show(api: Api, record_id: str, reveal: bool) -> None:
    """Show one dead letter in full."""
    params = {"reveal": "true"} if reveal else {}
    click.echo(
        json.dumps(api.call("GET", f"/v1/dead-letters/{record_id}", params=params), indent=2)
    )


@main.command()
@pass_api
def groups(api: Api) -> None:
    """Failure groups, most recent first."""
    for group in api.call("GET", "/v1/dead-letters/groups"):
        click.echo(
            f"{group['fingerprint']}  {group['count']:>6}  {group['source_queue']}  "
            f"{group['event_type'] or '-'}  {(group['reason'] or '')[:80]}"
        )


def _ramp(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[int]:
    try:
        sizes = [int(part) for part in (value or "").split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter("batch sizes separated by commas, say 1,2,5,20") from None
    if any(size < 1 for size in sizes):
        raise click.BadParameter("every batch size is at least 1")
    return sizes


@main.command()
@click.argument("record_id", required=False)
@click.option("--queue")
@click.option("--event-type")
@click.option("--fingerprint")
@click.option("--canary", default=10, show_default=True, help="Replays watched before the rest.")
@click.option(
    "--ramp",
    callback=_ramp,
    help="Batch sizes after the canary, each watched before the next (say 1,2,5,20).",
)
@click.option("--rate", type=float, help="Replays per second.")
@click.option("--canary-wait", type=float, help="Seconds each batch is watched.")
@click.option("--max-failure-rate", default=0.1, show_default=True)
@click.option("--wait/--no-wait", default=True, show_default=True, help="Follow the job.")
@pass_api
def replay(
    api: Api,
    record_id: str | None,
    queue: str | None,
    event_type: str | None,
    fingerprint: str | None,
    canary: int,
    ramp: list[int],
    rate: float | None,
    canary_wait: float | None,
    max_failure_rate: float,
    wait: bool,
) -> None:
    """Replay one dead letter, or a filtered set as a paced job: canary, ramp, then the rest."""
    if record_id:
        result = api.call("POST", f"/v1/dead-letters/{record_id}/replay")
        click.echo(f"replayed {result['record_id']} as {result['replay_id']}")
        return
    body: dict[str, Any] = _filters(queue=queue, event_type=event_type, fingerprint=fingerprint)
    if not body:
        raise click.UsageError("give a RECORD_ID, or --queue/--event-type/--fingerprint")
    body |= {"canary": canary, "max_failure_rate": max_failure_rate, "ramp": ramp}
    if rate:
        body["rate_per_second"] = rate
    if canary_wait is not None:
        body["canary_wait_seconds"] = canary_wait
    job = api.call("POST", "/v1/dead-letters/replay", json=body)
    click.echo(
        f"replay job {job['id']}: {job['total']} dead letters in batches "
        + (" + ".join(str(size) for size in job["batches"]) or "none")
    )
    if wait:
        _follow(api, job)


def _follow(api: Api, job: dict[str, Any]) -> None:
    """Print each step of a job until it ends, warning of new failures; exit 2 unless it
    completed."""
    step = None
    warned = 0
    while True:
        if job["status"] == "running" and (job["batch"], job["phase"]) != step:
            step = (job["batch"], job["phase"])
            click.echo(
                f"batch {job['batch']}/{len(job['batches'])} "
                f"({job['batches'][job['batch'] - 1]}): {job['phase']}, "
                f"{job['replayed']}/{job['total']} replayed"
            )
        if job["new_failures"] > warned:
            warned = job["new_failures"]
            click.echo(
                f"warning: {warned} new dead letter(s) joined this filter since the job "
                "started: the cause may not be fixed",
                err=True,
            )
        if job["status"] != "running":
            break
        time.sleep(0.5)
        job = api.call("GET", f"/v1/replays/{job['id']}")
    click.echo(
        f"{job['status']}: {job['replayed']} replayed, {job['failed_again']} failed again"
        + (f" — {job['reason']}" if job.get("reason") else "")
    )
    if job["status"] != "completed":
        sys.exit(2)


@main.command()
@pass_api
def jobs(api: Api) -> None:
    """The latest bulk replays, newest first."""
    for job in api.call("GET", "/v1/replays"):
        click.echo(
            f"{job['id']}  {job['status']:<11} {job['replayed']:>6}/{job['total']:<6} "
            f"failed again {job['failed_again']}, new failures {job['new_failures']}"
        )


@main.command()
@click.argument("job_id")
@click.option("--wait/--no-wait", default=False, show_default=True, help="Follow the job.")
@pass_api
def job(api: Api, job_id: str, wait: bool) -> None:
    """One bulk replay's state (JSON), or follow it with --wait."""
    state = api.call("GET", f"/v1/replays/{job_id}")
    if wait:
        _follow(api, state)
    else:
        click.echo(json.dumps(state, indent=2))


@main.command()
@click.argument("job_id")
@pass_api
def cancel(api: Api, job_id: str) -> None:
    """Cancel a bulk replay: it stops between two replays; the rest stays untouched."""
    api.call("POST", f"/v1/replays/{job_id}/cancel")
    deadline = time.monotonic() + 10
    state = api.call("GET", f"/v1/replays/{job_id}")
    while state["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
        state = api.call("GET", f"/v1/replays/{job_id}")
    click.echo(
        f"{state['status']}: {state['replayed']} of {state['total']} replayed, "
        f"{state['total'] - state['replayed'] - state['refused']} left untouched"
    )


@main.command()
@click.argument("record_id", required=False)
@click.option("--queue")
@click.option("--event-type")
@click.option("--fingerprint")
@click.option("--all", "everything", is_flag=True, help="Purge the whole archive.")
@click.confirmation_option(prompt="Purge these dead letters for good?")
@pass_api
def purge(
    api: Api,
    record_id: str | None,
    queue: str | None,
    event_type: str | None,
    fingerprint: str | None,
    everything: bool,
) -> None:
    """Delete one dead letter, or every one matching a filter (audited)."""
    if record_id:
        api.call("DELETE", f"/v1/dead-letters/{record_id}")
        click.echo(f"deleted {record_id}")
        return
    params = _filters(queue=queue, event_type=event_type, fingerprint=fingerprint)
    if everything:
        params["all"] = "true"
    if not params:
        raise click.UsageError("give a RECORD_ID, a filter, or --all")
    result = api.call("DELETE", "/v1/dead-letters", params=params)
    click.echo(f"purged {result['purged']}")
