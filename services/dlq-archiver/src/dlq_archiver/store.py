"""The archive in Redis: records, their indexes, failure groups, the audit trail, replay jobs.

Record ids are UUIDv7 strings, so every index is a sorted set scored 0 and ordered by member:
lexicographic order is archive-time order, cursors are ids, and a time window is an id range.
Insertion is one Lua script (dedup + record + indexes + group), so a record is either fully
archived or not at all, and a dead letter delivered twice is stored once. Behind Sentinel the
insertion is confirmed by ``COURIER_REDIS_MIN_REPLICAS`` replicas before the dead letter is
acknowledged (`courier_common.redis.Durability`): the broker forgets it at that ack, and a
failover must not take the only copy with it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import WatchError

from courier_common.messaging import new_event_id
from courier_common.redis import Durability
from dlq_archiver.records import DeadLetterRecord, ReplayEntry

_INSERT = """
local existing = redis.call('GET', KEYS[1])
if existing then return existing end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
redis.call('ZADD', KEYS[4], 0, ARGV[1])
redis.call('ZADD', KEYS[5], 0, ARGV[1])
if ARGV[4] == '1' then redis.call('ZADD', KEYS[6], 0, ARGV[1]) end
if ARGV[5] == '1' then redis.call('SADD', KEYS[7], ARGV[1]) end
local count = redis.call('HINCRBY', KEYS[8], 'count', 1)
if count == 1 then
  redis.call('HSET', KEYS[8], 'first_seen', ARGV[3], 'sample_id', ARGV[1],
             'source_queue', ARGV[6], 'event_type', ARGV[7], 'exception', ARGV[8],
             'reason', ARGV[9], 'fingerprint', ARGV[10])
end
redis.call('HSET', KEYS[8], 'last_seen', ARGV[3])
redis.call('ZADD', KEYS[9], ARGV[3], ARGV[10])
return ''
"""

_DELETE = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local rec = cjson.decode(raw)
local p = ARGV[1]
local id = rec['id']
redis.call('DEL', KEYS[1])
local replay = rec['replay_id']
if replay == cjson.null or replay == nil then replay = '' end
local mid = rec['message_id']
if mid == cjson.null or mid == nil then mid = '' end
redis.call('DEL', p .. 'dedup:' .. mid .. '|' .. replay)
redis.call('ZREM', p .. 'idx:time', id)
redis.call('ZREM', p .. 'idx:fp:' .. rec['fingerprint'], id)
redis.call('ZREM', p .. 'idx:queue:' .. rec['source_queue'], id)
if rec['event_type'] ~= cjson.null and rec['event_type'] ~= nil then
  redis.call('ZREM', p .. 'idx:type:' .. rec['event_type'], id)
end
if rec['user_id'] ~= cjson.null and rec['user_id'] ~= nil then
  redis.call('SREM', p .. 'idx:user:' .. rec['user_id'], id)
end
local group = p .. 'group:' .. rec['fingerprint']
if redis.call('HINCRBY', group, 'count', -1) <= 0 then
  redis.call('DEL', group)
  redis.call('ZREM', p .. 'groups', rec['fingerprint'])
end
return 1
"""


def id_bound(when: datetime) -> str:
    """The smallest UUIDv7 string for records archived at or after ``when``."""
    ms = int(when.timestamp() * 1000)
    hex12 = f"{ms:012x}"
    return f"{hex12[:8]}-{hex12[8:12]}-"


def id_time(record_id: str) -> datetime:
    """When a record was archived, read from its UUIDv7 id."""
    ms = int(record_id.replace("-", "")[:12], 16)
    return datetime.fromtimestamp(ms / 1000, UTC)


@dataclass(frozen=True, slots=True)
class Filter:
    """Which records a list, purge or bulk replay applies to."""

    queue: str | None = None
    event_type: str | None = None
    fingerprint: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    status: str | None = None

    def is_empty(self) -> bool:
        return not any(
            (self.queue, self.event_type, self.fingerprint, self.since, self.until, self.status)
        )

    def matches(self, record: DeadLetterRecord) -> bool:
        return (
            (self.queue is None or record.source_queue == self.queue)
            and (self.event_type is None or record.event_type == self.event_type)
            and (self.fingerprint is None or record.fingerprint == self.fingerprint)
            and (self.status is None or record.status == self.status)
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Filter:
        """The inverse of :meth:`as_dict` (a job keeps its filter as JSON)."""
        times = {k: datetime.fromisoformat(data[k]) for k in ("since", "until") if data.get(k)}
        return cls(**{**data, **times})

    def as_dict(self) -> dict[str, Any]:
        return {
            k: (v.isoformat() if isinstance(v, datetime) else v)
            for k, v in (
                ("queue", self.queue),
                ("event_type", self.event_type),
                ("fingerprint", self.fingerprint),
                ("since", self.since),
                ("until", self.until),
                ("status", self.status),
            )
            if v is not None
        }


class Archive:
    """Reads and writes of the archive."""

    def __init__(self, redis: Redis, *, prefix: str, durability: Durability | None = None) -> None:
        self.redis = redis
        self.p = prefix + "dlq:"
        self.durability = durability or Durability(fence_key=f"{prefix}replication-fence")
        self._insert = redis.register_script(_INSERT)
        self._delete = redis.register_script(_DELETE)

    def _rec(self, record_id: str) -> str:
        return f"{self.p}rec:{record_id}"

    async def insert(self, record: DeadLetterRecord) -> str | None:
        """Store ``record``; the id of the record already stored for it when a duplicate.

        Either way the record is on the replicas when this returns (a duplicate's first copy
        included: the fence covers what the script found); ``NotReplicatedError`` otherwise,
        and the caller tries again.
        """
        last_seen_ms = str(int(record.archived_at.timestamp() * 1000))
        existing = await self.durability.script(
            self.redis,
            self._insert,
            keys=[
                f"{self.p}dedup:{record.message_id or ''}|{record.replay_id or ''}",
                self._rec(record.id),
                f"{self.p}idx:time",
                f"{self.p}idx:fp:{record.fingerprint}",
                f"{self.p}idx:queue:{record.source_queue}",
                f"{self.p}idx:type:{record.event_type or '-'}",
                f"{self.p}idx:user:{record.user_id or '-'}",
                f"{self.p}group:{record.fingerprint}",
                f"{self.p}groups",
            ],
            args=[
                record.id,
                record.model_dump_json(),
                last_seen_ms,
                "1" if record.event_type else "0",
                "1" if record.user_id else "0",
                record.source_queue,
                record.event_type or "",
                record.exception or "",
                record.reason[:500],
                record.fingerprint,
            ],
        )
        text = existing.decode() if isinstance(existing, bytes) else str(existing)
        return text or None

    async def get(self, record_id: str) -> DeadLetterRecord | None:
        raw = await self.redis.get(self._rec(record_id))
        return None if raw is None else DeadLetterRecord.model_validate_json(raw)

    async def get_many(self, ids: Sequence[str]) -> list[DeadLetterRecord]:
        if not ids:
            return []
        raws = await self.redis.mget([self._rec(i) for i in ids])
        return [DeadLetterRecord.model_validate_json(r) for r in raws if r is not None]

    async def save(self, record: DeadLetterRecord) -> None:
        """Rewrite a record in place (status, replays, redaction); indexes do not change.

        Last writer wins: to change a record that others may change meanwhile (replays,
        erasure), use `update`.
        """
        await self.redis.set(self._rec(record.id), record.model_dump_json(), xx=True)

    async def update(
        self, record_id: str, change: Callable[[DeadLetterRecord], bool]
    ) -> DeadLetterRecord | None:
        """Read, change and write one record atomically (optimistic: WATCH, retried on races).

        *change* mutates the record it is given and returns False to leave it as it was. Two
        replays of one record at once both land in its history, and a replay marked while the
        user's data is being erased cannot write the unredacted body back.
        Returns the record as written (or as found), None when there is no such record.
        """
        key = self._rec(record_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if raw is None:
                        return None
                    record = DeadLetterRecord.model_validate_json(raw)
                    if not change(record):
                        return record  # leaving the block resets the pipeline: unwatched
                    pipe.multi()  # type: ignore[no-untyped-call]  # untyped in redis-py
                    pipe.set(key, record.model_dump_json(), xx=True)
                    await pipe.execute()
                    return record
                except WatchError:
                    continue

    async def delete(self, record_id: str) -> bool:
        return bool(await self._delete(keys=[self._rec(record_id)], args=[self.p]))

    def _index_for(self, flt: Filter) -> str:
        if flt.fingerprint:
            return f"{self.p}idx:fp:{flt.fingerprint}"
        if flt.event_type:
            return f"{self.p}idx:type:{flt.event_type}"
        if flt.queue:
            return f"{self.p}idx:queue:{flt.queue}"
        return f"{self.p}idx:time"

    async def page(
        self, flt: Filter, *, limit: int = 50, cursor: str | None = None, scan_max: int = 5000
    ) -> tuple[list[DeadLetterRecord], str | None]:
        """Newest first; ``cursor`` is the last id of the previous page."""
        index = self._index_for(flt)
        upper = f"({cursor}" if cursor else "+"
        if flt.until is not None:
            bound = "(" + id_bound(flt.until)
            upper = bound if upper == "+" or bound < upper else upper
        lower = "[" + id_bound(flt.since) if flt.since is not None else "-"
        found: list[DeadLetterRecord] = []
        scanned = 0
        last: str | None = None
        while len(found) < limit and scanned < scan_max:
            ids = [
                i.decode() if isinstance(i, bytes) else i
                for i in await self.redis.zrevrangebylex(index, upper, lower, start=0, num=200)
            ]
            if not ids:
                return found, None
            scanned += len(ids)
            for record in await self.get_many(ids):
                last = record.id
                if flt.matches(record):
                    found.append(record)
                    if len(found) == limit:
                        break
            if len(found) < limit:
                last = ids[-1]
            upper = f"({last}"
        more = bool(
            last and await self.redis.zrevrangebylex(index, f"({last}", lower, start=0, num=1)
        )
        return found, last if more else None

    async def ids_matching(self, flt: Filter, *, max_count: int = 100_000) -> list[str]:
        """Every matching id, oldest first (for purge and bulk replay)."""
        ids: list[str] = []
        cursor: str | None = None
        while len(ids) < max_count:
            page, cursor = await self.page(flt, limit=500, cursor=cursor)
            ids.extend(r.id for r in page)
            if cursor is None:
                break
        ids.reverse()
        return ids[:max_count]

    async def confirmed_records(self, ids: Sequence[str]) -> list[DeadLetterRecord]:
        """The records as the primary has them, once the replicas confirmed them too.

        What a change made through `update` may promise before its event is acknowledged
        (the fence covers writes made on other connections before it).
        """
        keys = [self._rec(i) for i in ids]
        (raws,) = await self.durability.commands(self.redis, lambda pipe: pipe.mget(keys))
        return [DeadLetterRecord.model_validate_json(r) for r in raws if r is not None]

    async def user_record_ids(self, user_id: str) -> list[str]:
        members = await self.redis.smembers(f"{self.p}idx:user:{user_id}")
        return sorted(m.decode() if isinstance(m, bytes) else m for m in members)

    async def groups(self, *, limit: int = 100) -> list[dict[str, Any]]:
        """The failure groups, the latest failure first."""
        fingerprints = await self.redis.zrevrange(f"{self.p}groups", 0, limit - 1)
        found = [
            await self.group(fp.decode() if isinstance(fp, bytes) else str(fp))
            for fp in fingerprints
        ]
        return [group for group in found if group is not None]

    async def group(self, fingerprint: str) -> dict[str, Any] | None:
        raw = await self.redis.hgetall(f"{self.p}group:{fingerprint}")
        data = {_s(k): _s(v) for k, v in raw.items()}
        if not data:
            return None
        return {
            "fingerprint": fingerprint,
            "count": int(data.get("count", 0)),
            "first_seen": _ms_iso(data.get("first_seen")),
            "last_seen": _ms_iso(data.get("last_seen")),
            "source_queue": data.get("source_queue"),
            "event_type": data.get("event_type") or None,
            "exception": data.get("exception") or None,
            "reason": data.get("reason"),
            "sample_id": data.get("sample_id"),
        }

    async def size(self) -> int:
        return int(await self.redis.zcard(f"{self.p}idx:time"))

    async def oldest_id(self) -> str | None:
        first = await self.redis.zrangebylex(f"{self.p}idx:time", "-", "+", start=0, num=1)
        if not first:
            return None
        value = first[0]
        return value.decode() if isinstance(value, bytes) else str(value)

    async def trim(self, *, max_age_seconds: float | None, max_count: int | None) -> int:
        """Delete records past the retention limits; returns how many went."""
        removed = 0
        index = f"{self.p}idx:time"
        if max_age_seconds is not None:
            cutoff = datetime.fromtimestamp(time.time() - max_age_seconds, UTC)
            while True:
                old = await self.redis.zrangebylex(
                    index, "-", "(" + id_bound(cutoff), start=0, num=500
                )
                if not old:
                    break
                for value in old:
                    removed += await self.delete(
                        value.decode() if isinstance(value, bytes) else value
                    )
        if max_count is not None:
            excess = await self.size() - max_count
            if excess > 0:
                old = await self.redis.zrangebylex(index, "-", "+", start=0, num=excess)
                for value in old:
                    removed += await self.delete(
                        value.decode() if isinstance(value, bytes) else value
                    )
        return removed

    async def audit(self, action: str, *, what: dict[str, Any], count: int) -> None:
        await self.redis.xadd(
            f"{self.p}audit",
            {
                "at": datetime.now(UTC).isoformat(),
                "action": action,
                "what": json.dumps(what, default=str),
                "count": str(count),
            },
            maxlen=100_000,
            approximate=True,
        )

    async def audit_entries(self, count: int = 100) -> list[dict[str, str]]:
        entries: Any = await self.redis.xrevrange(f"{self.p}audit", count=count)
        return [{_s(k): _s(v) for k, v in fields.items()} for _, fields in entries or []]

    async def mark_replayed(self, record_id: str, replay_id: str, job_id: str | None) -> None:
        entry = ReplayEntry(replay_id=replay_id, at=datetime.now(UTC), job_id=job_id)

        def change(record: DeadLetterRecord) -> bool:
            record.status = "replayed"
            record.replays.append(entry)
            return True

        await self.update(record_id, change)

    async def mark_replay_failed(self, original_id: str, failed_id: str) -> None:
        """The replay of ``original_id`` died again as ``failed_id``: link them."""

        def change(record: DeadLetterRecord) -> bool:
            record.status = "replay-failed"
            return True

        if await self.update(original_id, change) is None:
            return
        await self.redis.sadd(f"{self.p}replay-failures:{original_id}", failed_id)

    async def replay_failures(self, original_id: str) -> list[str]:
        members = await self.redis.smembers(f"{self.p}replay-failures:{original_id}")
        return sorted(m.decode() if isinstance(m, bytes) else m for m in members)

    # Replay jobs ---------------------------------------------------------------------------

    def _job(self, job_id: str) -> str:
        return f"{self.p}job:{job_id}"

    async def create_job(self, fields: dict[str, Any], ids: list[str]) -> str:
        job_id = str(new_event_id())
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._job(job_id), mapping={k: json.dumps(v) for k, v in fields.items()})
            if ids:
                pipe.rpush(self._job(job_id) + ":ids", *ids)
            pipe.zadd(f"{self.p}jobs", {job_id: 0})
            await pipe.execute()
        return job_id

    async def recent_jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        """The latest jobs, newest first (job ids are UUIDv7: their order is their age)."""
        ids = await self.redis.zrevrangebylex(f"{self.p}jobs", "+", "-", start=0, num=limit)
        jobs = [await self.get_job(_s(i)) for i in ids]
        return [job for job in jobs if job is not None]

    async def job_ids(self, job_id: str) -> list[str]:
        values = await self.redis.lrange(self._job(job_id) + ":ids", 0, -1)
        return [v.decode() if isinstance(v, bytes) else v for v in values]

    async def update_job(self, job_id: str, **fields: Any) -> None:
        await self.redis.hset(
            self._job(job_id), mapping={k: json.dumps(v, default=str) for k, v in fields.items()}
        )

    async def job_failed_again(self, job_id: str) -> int:
        return int(await self.redis.scard(self._job(job_id) + ":failed"))

    async def record_job_failure(self, job_id: str, record_id: str) -> None:
        await self.redis.sadd(self._job(job_id) + ":failed", record_id)

    async def get_job(self, job_id: str) -> dict[str, Any] | None:
        raw = await self.redis.hgetall(self._job(job_id))
        if not raw:
            return None
        job = {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}
        job["id"] = job_id
        job["failed_again"] = await self.job_failed_again(job_id)
        job["new_failures"] = await self._new_failures(job)
        return job

    async def request_cancel(self, job_id: str) -> bool:
        """Ask a running job to stop between two replays; False when it is not running.

        The flag is in Redis, so the archiver replica running the job sees it whichever
        replica took the request.
        """
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self._job(job_id))
                    status = await pipe.hget(self._job(job_id), "status")
                    if status is None or json.loads(status) != "running":
                        return False
                    pipe.multi()  # type: ignore[no-untyped-call]  # untyped in redis-py
                    pipe.hset(self._job(job_id), "cancel_requested", "true")
                    await pipe.execute()
                    return True
                except WatchError:
                    continue

    async def cancel_requested(self, job_id: str) -> bool:
        return await self.redis.hget(self._job(job_id), "cancel_requested") in (b"true", "true")

    async def newest_id(self, flt: Filter) -> str | None:
        """The newest record id in the index ``flt`` reads: a job's watermark for new failures."""
        newest = await self.redis.zrevrangebylex(self._index_for(flt), "+", "-", start=0, num=1)
        return _s(newest[0]) if newest else None

    async def _new_failures(self, job: dict[str, Any], *, exact_up_to: int = 1000) -> int:
        """Dead letters that joined a job's filter after it started (its watermark), its own
        replays that died again aside: the provider is still failing for fresh traffic.

        Exact for the first ``exact_up_to`` of them; past that, counted from the index.
        """
        if "watermark" not in job:  # a job from before new failures were tracked
            return 0
        flt = replace(Filter.from_dict(job.get("filter", {})), status=None)
        if flt.until is not None and flt.until <= datetime.fromisoformat(job["created_at"]):
            return 0
        index = self._index_for(flt)
        lower = f"({job['watermark']}" if job["watermark"] else "-"
        total = int(await self.redis.zlexcount(index, lower, "+"))
        if total == 0:
            return 0
        ids = [_s(i) for i in await self.redis.zrangebylex(index, lower, "+", 0, exact_up_to)]
        own = f"{job['id']}."
        fresh = sum(
            1
            for record in await self.get_many(ids)
            if flt.matches(record) and not (record.replay_id or "").startswith(own)
        )
        return fresh + max(0, total - len(ids))

    async def running_jobs(self) -> list[str]:
        out = []
        async for key in self.redis.scan_iter(match=f"{self.p}job:*", count=500):
            name = key.decode() if isinstance(key, bytes) else key
            if not name.endswith((":ids", ":failed")):  # the job hash, not its lists
                status = await self.redis.hget(name, "status")
                if status is not None and json.loads(status) == "running":
                    out.append(name.rsplit("job:", 1)[1])
        return out


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ms_iso(value: str | None) -> str | None:
    if not value:
        return None
    return datetime.fromtimestamp(int(value) / 1000, UTC).isoformat()
