"""``courier-dlq``: the operator's command line for the archiver's HTTP API.

    courier-dlq list [--queue Q] [--event-type T] [--fingerprint F] [--limit N]
    courier-dlq show ID [--reveal]
    courier-dlq groups
    courier-dlq replay ID
    courier-dlq replay --queue Q | --fingerprint F [--canary N] [--rate R] [--wait]
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


@main.command()
@click.argument("record_id", required=False)
@click.option("--queue")
@click.option("--event-type")
@click.option("--fingerprint")
@click.option("--canary", default=10, show_default=True, help="Replays watched before the rest.")
@click.option("--rate", type=float, help="Replays per second.")
@click.option("--canary-wait", type=float, help="Seconds to watch the canary.")
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
    rate: float | None,
    canary_wait: float | None,
    max_failure_rate: float,
    wait: bool,
) -> None:
    """Replay one dead letter, or a filtered set as a paced job with a canary."""
    if record_id:
        result = api.call("POST", f"/v1/dead-letters/{record_id}/replay")
        click.echo(f"replayed {result['record_id']} as {result['replay_id']}")
        return
    body: dict[str, Any] = _filters(queue=queue, event_type=event_type, fingerprint=fingerprint)
    if not body:
        raise click.UsageError("give a RECORD_ID, or --queue/--event-type/--fingerprint")
    body |= {"canary": canary, "max_failure_rate": max_failure_rate}
    if rate:
        body["rate_per_second"] = rate
    if canary_wait is not None:
        body["canary_wait_seconds"] = canary_wait
    job = api.call("POST", "/v1/dead-letters/replay", json=body)
    click.echo(f"replay job {job['id']}: {job['total']} dead letters")
    if not wait:
        return
    with click.progressbar(length=max(job["total"], 1), label="replaying") as bar:
        done = 0
        while job["status"] == "running":
            time.sleep(0.5)
            job = api.call("GET", f"/v1/replays/{job['id']}")
            bar.update(max(0, job["replayed"] - done))
            done = max(done, job["replayed"])
    click.echo(
        f"{job['status']}: {job['replayed']} replayed, {job['failed_again']} failed again"
        + (f" — {job['reason']}" if job.get("reason") else "")
    )
    if job["status"] != "completed":
        sys.exit(2)


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
