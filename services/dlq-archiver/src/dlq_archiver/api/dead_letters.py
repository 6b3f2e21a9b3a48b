"""``/v1/dead-letters`` and ``/v1/replays``: inspect, group, replay and purge dead letters."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field

from courier_common.http import ProblemError, problem_responses
from courier_common.logging import get_logger
from courier_common.messaging import PublishError
from dlq_archiver.api.deps import AdminDep, ArchiveDep, IsAdminDep, ReplayerDep, SettingsDep
from dlq_archiver.records import mask
from dlq_archiver.replay import BulkReplayRequest, ReplayRefused
from dlq_archiver.store import Filter

log = get_logger(__name__)
router = APIRouter(tags=["dead letters"])

Queue = Annotated[str | None, Query(max_length=255, description="Queue the message died in")]
EventType = Annotated[str | None, Query(max_length=255)]
Fingerprint = Annotated[str | None, Query(pattern=r"^[0-9a-f]{16}$")]
Since = Annotated[datetime | None, Query(description="Archived at or after (ISO 8601)")]
Until = Annotated[datetime | None, Query(description="Archived before (ISO 8601)")]
Status = Annotated[str | None, Query(pattern=r"^(dead|replayed|replay-failed)$")]
Id = Annotated[str, Path(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")]


class Page(BaseModel):
    items: list[dict[str, Any]]
    next_cursor: str | None


class Group(BaseModel):
    fingerprint: str
    count: int
    first_seen: str | None
    last_seen: str | None
    source_queue: str | None
    event_type: str | None
    exception: str | None
    reason: str | None
    sample_id: str | None


class ReplayAccepted(BaseModel):
    record_id: str
    replay_id: str


class BulkReplayBody(BaseModel):
    """Which dead letters to replay, and how carefully."""

    model_config = ConfigDict(extra="forbid")

    queue: str | None = Field(default=None, max_length=255)
    event_type: str | None = Field(default=None, max_length=255)
    fingerprint: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$")
    since: datetime | None = None
    until: datetime | None = None
    rate_per_second: float | None = Field(default=None, gt=0, le=10_000)
    canary: int = Field(default=10, ge=0, le=10_000)
    canary_wait_seconds: float | None = Field(default=None, ge=0, le=3600)
    max_failure_rate: float = Field(default=0.1, ge=0, le=1)
    limit: int = Field(default=10_000, ge=1, le=100_000)
    ramp: list[Annotated[int, Field(ge=1, le=100_000)]] = Field(
        default_factory=list,
        max_length=20,
        description="Batch sizes after the canary (say 1, 2, 5, 20), each watched for "
        "canary_wait_seconds before the next; the rest goes after the last.",
    )


class Job(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    status: str = Field(description="running, completed, halted, cancelled or interrupted")
    total: int
    replayed: int
    failed_again: int = Field(description="Replays of this job that died again")
    new_failures: int = Field(
        default=0,
        description="Dead letters that joined the job's filter after it started, its own "
        "replays aside: the cause may not be fixed",
    )
    batches: list[int] = Field(default_factory=list, description="Planned batch sizes")
    batch: int = Field(default=0, description="The batch being replayed or watched (1-based)")


class Purged(BaseModel):
    purged: int


def _filter(
    queue: str | None,
    event_type: str | None,
    fingerprint: str | None,
    since: datetime | None,
    until: datetime | None,
    status_: str | None = None,
) -> Filter:
    return Filter(queue, event_type, fingerprint, since, until, status_)


@router.get(
    "/v1/dead-letters",
    response_model=Page,
    responses=problem_responses(422),
    summary="List dead letters, newest first",
)
async def list_dead_letters(
    archive: ArchiveDep,
    queue: Queue = None,
    event_type: EventType = None,
    fingerprint: Fingerprint = None,
    since: Since = None,
    until: Until = None,
    status_: Annotated[Status, Query(alias="status")] = None,
    cursor: Annotated[str | None, Query(pattern=r"^[0-9a-f-]{36}$")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> Page:
    """Summaries with emails and phone numbers masked; ``next_cursor`` pages on."""
    flt = _filter(queue, event_type, fingerprint, since, until, status_)
    records, next_cursor = await archive.page(flt, limit=limit, cursor=cursor)
    return Page(items=[r.view(full=False) for r in records], next_cursor=next_cursor)


@router.get(
    "/v1/dead-letters/groups",
    response_model=list[Group],
    summary="Failure groups: dead letters by fingerprint",
)
async def groups(
    archive: ArchiveDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[Group]:
    """Grouped by source queue + event type + exception + normalized reason; most recent
    failure first. The sample reason is masked as a dead letter's is."""
    return [Group(**mask(g)) for g in await archive.groups(limit=limit)]


@router.post(
    "/v1/dead-letters/replay",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Job,
    responses=problem_responses(401, 403, 422),
    summary="Replay by filter or group: paced, canary first, halts on failures",
)
async def bulk_replay(
    body: BulkReplayBody,
    _: AdminDep,
    archive: ArchiveDep,
    replayer: ReplayerDep,
    settings: SettingsDep,
) -> Job:
    flt = Filter(body.queue, body.event_type, body.fingerprint, body.since, body.until, "dead")
    if flt.is_empty() or flt == Filter(status="dead"):
        raise ProblemError(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "Filter required",
            "Name a queue, event type, fingerprint or time window to replay.",
        )
    job_id = await replayer.start_job(
        BulkReplayRequest(
            filter=flt,
            rate_per_second=body.rate_per_second or settings.replay_rate_per_second,
            canary=body.canary,
            canary_wait_seconds=(
                body.canary_wait_seconds
                if body.canary_wait_seconds is not None
                else settings.replay_canary_wait_seconds
            ),
            max_failure_rate=body.max_failure_rate,
            limit=body.limit,
            ramp=tuple(body.ramp),
        )
    )
    job = await archive.get_job(job_id)
    assert job is not None
    return Job(**job)


@router.get("/v1/replays", response_model=list[Job], summary="The latest bulk replays")
async def replay_jobs(
    archive: ArchiveDep, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> list[Job]:
    return [Job(**job) for job in await archive.recent_jobs(limit)]


@router.post(
    "/v1/replays/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Job,
    responses=problem_responses(401, 403, 404, 409, 422),
    summary="Cancel a bulk replay: it stops between two replays",
)
async def cancel_replay_job(job_id: Id, _: AdminDep, archive: ArchiveDep) -> Job:
    """What it replayed stays replayed; the rest stays in the archive, untouched. The job
    reads ``cancelled`` once it has stopped (within a fraction of a second)."""
    if not await archive.request_cancel(job_id):
        job = await archive.get_job(job_id)
        if job is None:
            raise ProblemError(status.HTTP_404_NOT_FOUND, "Replay job not found")
        raise ProblemError(
            status.HTTP_409_CONFLICT, "Not running", f"The job is {job['status']} already."
        )
    await archive.audit("bulk_replay_cancel_requested", what={"job_id": job_id}, count=0)
    log.info("bulk_replay_cancel_requested", job_id=job_id)
    job = await archive.get_job(job_id)
    assert job is not None
    return Job(**job)


@router.get(
    "/v1/replays/{job_id}",
    response_model=Job,
    responses=problem_responses(404, 422),
    summary="Progress of a bulk replay",
)
async def replay_job(job_id: Id, archive: ArchiveDep) -> Job:
    job = await archive.get_job(job_id)
    if job is None:
        raise ProblemError(status.HTTP_404_NOT_FOUND, "Replay job not found")
    return Job(**job)


@router.get(
    "/v1/dead-letters/{record_id}",
    responses=problem_responses(401, 403, 404, 422),
    summary="One dead letter, whole",
)
async def show(
    record_id: Id,
    archive: ArchiveDep,
    admin: IsAdminDep,
    reveal: Annotated[bool, Query(description="Unmasked; needs the admin token")] = False,
) -> dict[str, Any]:
    if reveal and not admin:
        raise ProblemError(
            status.HTTP_401_UNAUTHORIZED,
            "Authentication required",
            "reveal=true needs the admin bearer token.",
            headers={"WWW-Authenticate": 'Bearer realm="dlq-archiver"'},
        )
    record = await archive.get(record_id)
    if record is None:
        raise ProblemError(status.HTTP_404_NOT_FOUND, "Dead letter not found")
    view = record.view(reveal=reveal)
    view["replay_failures"] = await archive.replay_failures(record.id)
    if reveal:
        await archive.audit("reveal", what={"record_id": record.id}, count=1)
        log.info("dead_letter_revealed", record_id=record.id)
    return view


@router.post(
    "/v1/dead-letters/{record_id}/replay",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ReplayAccepted,
    responses=problem_responses(401, 403, 404, 409, 422, 503),
    summary="Replay one dead letter to the queue it failed in",
)
async def replay_one(
    record_id: Id, _: AdminDep, archive: ArchiveDep, replayer: ReplayerDep
) -> ReplayAccepted:
    record = await archive.get(record_id)
    if record is None:
        raise ProblemError(status.HTTP_404_NOT_FOUND, "Dead letter not found")
    try:
        replay_id = await replayer.replay(record)
    except ReplayRefused as exc:
        raise ProblemError(status.HTTP_409_CONFLICT, "Cannot replay", str(exc)) from None
    except PublishError as exc:
        raise ProblemError(
            status.HTTP_503_SERVICE_UNAVAILABLE, "Broker unavailable", str(exc)
        ) from None
    await archive.audit("replay", what={"record_id": record.id, "replay_id": replay_id}, count=1)
    return ReplayAccepted(record_id=record.id, replay_id=replay_id)


@router.delete(
    "/v1/dead-letters/{record_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=problem_responses(401, 403, 404, 422),
    summary="Delete one dead letter",
)
async def delete_one(record_id: Id, _: AdminDep, archive: ArchiveDep) -> Response:
    if not await archive.delete(record_id):
        raise ProblemError(status.HTTP_404_NOT_FOUND, "Dead letter not found")
    await archive.audit("delete", what={"record_id": record_id}, count=1)
    log.info("dead_letter_deleted", record_id=record_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.delete(
    "/v1/dead-letters",
    response_model=Purged,
    responses=problem_responses(401, 403, 422),
    summary="Purge dead letters by filter",
)
async def purge(
    _: AdminDep,
    archive: ArchiveDep,
    queue: Queue = None,
    event_type: EventType = None,
    fingerprint: Fingerprint = None,
    since: Since = None,
    until: Until = None,
    status_: Annotated[Status, Query(alias="status")] = None,
    all_: Annotated[bool, Query(alias="all", description="Purge everything")] = False,
) -> Purged:
    flt = _filter(queue, event_type, fingerprint, since, until, status_)
    if flt.is_empty() and not all_:
        raise ProblemError(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "Filter required",
            "Name a filter, or pass all=true to purge the whole archive.",
        )
    ids = await archive.ids_matching(flt)
    purged = 0
    for record_id in ids:
        purged += await archive.delete(record_id)
    await archive.audit("purge", what=flt.as_dict() or {"all": True}, count=purged)
    log.info("dead_letters_purged", count=purged, **flt.as_dict())
    return Purged(purged=purged)


@router.get(
    "/v1/audit",
    responses=problem_responses(401, 403, 422),
    summary="The audit trail: every replay, purge, delete, reveal and erasure",
)
async def audit(
    _: AdminDep, archive: ArchiveDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[dict[str, str]]:
    return await archive.audit_entries(limit)
