"""Users in Redis, and the transactional outbox beside them.

Every change writes the user, its email claim and the outbox entry in ONE Lua script: Redis
runs a script atomically, so a registration either happened with its event queued, or did not
happen at all. The broker is not on this path; the relay (:mod:`user_service.outbox`)
publishes the entries later.

Behind Sentinel a change is also confirmed by ``COURIER_REDIS_MIN_REPLICAS`` replicas before
the API acknowledges it (`courier_common.redis.Durability`: the script, a fence and ``WAIT``
on one connection), so a failover cannot take back a 201, a 200 or a 204: when the replicas
do not confirm in time the write raises ``NotReplicatedError`` and the client gets the 503
"may have been applied". What the API answers from what it *finds* (a replayed
Idempotency-Key, a PATCH that changes nothing) is confirmed the same way, since it may be a
write whose own answer was that 503.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from courier_common.events import (
    USER_SERVICE_SOURCE,
    UserDeleted,
    UserRegistered,
    UserUpdated,
)
from courier_common.messaging import EventData, new_event, new_event_id
from courier_common.messaging.tracing import inject_context
from courier_common.redis import Durability, NotReplicatedError
from user_service.models import StoredUser, User, email_key

_CREATE = """
if ARGV[7] ~= '' then
  local prior = redis.call('GET', KEYS[4])
  if prior then return {'replay', prior} end
end
local owner = redis.call('GET', KEYS[2])
if owner then return {'conflict', owner} end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('XADD', KEYS[3], '*', 'event', ARGV[3], 'routing_key', ARGV[4],
           'event_id', ARGV[9], 'traceparent', ARGV[5], 'tracestate', ARGV[6])
if ARGV[7] ~= '' then
  redis.call('SET', KEYS[4], ARGV[7], 'EX', ARGV[8])
end
return {'created', ''}
"""

_UPDATE = """
local current = redis.call('GET', KEYS[1])
if not current then return 'missing' end
if tostring(cjson.decode(current)['version']) ~= ARGV[1] then return 'stale' end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('XADD', KEYS[2], '*', 'event', ARGV[3], 'routing_key', ARGV[4],
           'event_id', ARGV[7], 'traceparent', ARGV[5], 'tracestate', ARGV[6])
return 'ok'
"""

_DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
redis.call('DEL', KEYS[1])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('XADD', KEYS[3], '*', 'event', ARGV[2], 'routing_key', ARGV[3],
           'event_id', ARGV[6], 'traceparent', ARGV[4], 'tracestate', ARGV[5])
return 'ok'
"""


@dataclass(frozen=True, slots=True)
class IdempotentResponse:
    """The first response to a request with an ``Idempotency-Key``, kept to replay it."""

    fingerprint: str
    status: int
    body: Any
    location: str | None = None

    def dumps(self) -> str:
        return json.dumps(
            {
                "fingerprint": self.fingerprint,
                "status": self.status,
                "body": self.body,
                "location": self.location,
            }
        )

    @classmethod
    def loads(cls, raw: str | bytes) -> IdempotentResponse:
        data = json.loads(raw)
        return cls(data["fingerprint"], data["status"], data["body"], data.get("location"))


@dataclass(frozen=True, slots=True)
class Created:
    user: User


@dataclass(frozen=True, slots=True)
class EmailTaken:
    existing_id: str


@dataclass(frozen=True, slots=True)
class Replay:
    response: IdempotentResponse


CreateResult = Created | EmailTaken | Replay


class UserStore:
    """Reads and atomic writes of users, email claims and outbox entries."""

    def __init__(self, redis: Redis, *, prefix: str, durability: Durability | None = None) -> None:
        self.redis = redis
        self.prefix = prefix
        self.durability = durability or Durability(fence_key=f"{prefix}replication-fence")
        self.outbox_key = f"{prefix}outbox"
        self._create = redis.register_script(_CREATE)
        self._update = redis.register_script(_UPDATE)
        self._delete = redis.register_script(_DELETE)

    def _user_key(self, user_id: UUID | str) -> str:
        return f"{self.prefix}user:{user_id}"

    def _email_key(self, email: str) -> str:
        return f"{self.prefix}user-email:{email_key(email)}"

    def _idempotency_key(self, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return f"{self.prefix}http-idem:{digest}"

    @staticmethod
    def _outbox_fields(data: EventData) -> tuple[str, str, str, str, str]:
        """(event JSON, routing key, traceparent, tracestate, event id) for an outbox entry."""
        event = new_event(data, source=USER_SERVICE_SOURCE, event_id=new_event_id())
        carrier: dict[str, Any] = {}
        inject_context(carrier)
        return (
            event.encode().decode(),
            event.type,
            str(carrier.get("traceparent", "")),
            str(carrier.get("tracestate", "")),
            str(event.id),
        )

    async def get(self, user_id: UUID) -> StoredUser | None:
        raw = await self.redis.get(self._user_key(user_id))
        return None if raw is None else StoredUser.model_validate_json(raw)

    async def find_by_email(self, email: str) -> User | None:
        user_id = await self.redis.get(self._email_key(email))
        if user_id is None:
            return None
        stored = await self.get(UUID(user_id.decode() if isinstance(user_id, bytes) else user_id))
        return None if stored is None else stored.user

    async def idempotent_response(self, key: str) -> IdempotentResponse | None:
        raw = await self.redis.get(self._idempotency_key(key))
        return None if raw is None else IdempotentResponse.loads(raw)

    async def confirmed_response(self, key: str) -> IdempotentResponse:
        """The stored first response, read again and confirmed by the replicas.

        Raises ``NotReplicatedError`` when the replicas do not confirm it, or when it is gone
        (a failover took it, and maybe the registration with it): the outcome is in doubt.
        """
        redis_key = self._idempotency_key(key)

        def read(pipe: Pipeline) -> None:
            pipe.get(redis_key)

        (raw,) = await self.durability.commands(self.redis, read)
        if raw is None:
            raise NotReplicatedError(0, self.durability.min_replicas, self.durability.timeout_ms)
        return IdempotentResponse.loads(raw)

    async def confirmed_get(self, user_id: UUID) -> StoredUser | None:
        """`get`, confirmed by the replicas: what an answer built from a read may promise."""
        redis_key = self._user_key(user_id)

        def read(pipe: Pipeline) -> None:
            pipe.get(redis_key)

        (raw,) = await self.durability.commands(self.redis, read)
        return None if raw is None else StoredUser.model_validate_json(raw)

    async def remember_response(self, key: str, response: IdempotentResponse, ttl: int) -> None:
        """Keep a non-201 first response (e.g. 409) so a retry replays it too."""
        await self.redis.set(self._idempotency_key(key), response.dumps(), nx=True, ex=ttl)

    async def create(
        self,
        user: User,
        *,
        idempotency: tuple[str, IdempotentResponse] | None = None,
        idempotency_ttl: int = 86400,
    ) -> CreateResult:
        """Create the user, claim the email and queue ``user.registered``, atomically."""
        data = UserRegistered(user_id=user.id, **_contact(user))
        event_json, routing_key, traceparent, tracestate, event_id = self._outbox_fields(data)
        idem_key, idem_record = (
            (self._idempotency_key(idempotency[0]), idempotency[1].dumps())
            if idempotency
            else (f"{self.prefix}http-idem:-", "")
        )
        result = await self.durability.script(
            self.redis,
            self._create,
            keys=[self._user_key(user.id), self._email_key(user.email), self.outbox_key, idem_key],
            args=[
                StoredUser(user=user).model_dump_json(),
                str(user.id),
                event_json,
                routing_key,
                traceparent,
                tracestate,
                idem_record,
                idempotency_ttl,
                event_id,
            ],
        )
        outcome, detail = (_text(part) for part in result)
        if outcome == "replay":
            return Replay(IdempotentResponse.loads(detail))
        if outcome == "conflict":
            return EmailTaken(detail)
        return Created(user)

    async def update(self, stored: StoredUser, updated: User) -> Literal["ok", "missing", "stale"]:
        """Write ``updated`` if nobody changed the user since ``stored`` was read."""
        data = UserUpdated(
            user_id=updated.id,
            **_contact(updated),
            previous_channels=tuple(stored.user.channels),
            changed=tuple(
                name
                for name in ("display_name", "locale", "channels", "phone", "push_token")
                if getattr(stored.user, name) != getattr(updated, name)
            ),
        )
        event_json, routing_key, traceparent, tracestate, event_id = self._outbox_fields(data)
        result = await self.durability.script(
            self.redis,
            self._update,
            keys=[self._user_key(updated.id), self.outbox_key],
            args=[
                str(stored.version),
                StoredUser(user=updated, version=stored.version + 1).model_dump_json(),
                event_json,
                routing_key,
                traceparent,
                tracestate,
                event_id,
            ],
        )
        outcome = _text(result)
        assert outcome in ("ok", "missing", "stale")
        return outcome  # type: ignore[return-value]

    async def delete(self, user: User) -> bool:
        """Erase the user and release the email; queue ``user.deleted``. False if absent."""
        event_json, routing_key, traceparent, tracestate, event_id = self._outbox_fields(
            UserDeleted(user_id=user.id)
        )
        result = await self.durability.script(
            self.redis,
            self._delete,
            keys=[self._user_key(user.id), self._email_key(user.email), self.outbox_key],
            args=[str(user.id), event_json, routing_key, traceparent, tracestate, event_id],
        )
        return _text(result) == "ok"

    async def ping(self) -> bool:
        return bool(await self.redis.ping())


def _contact(user: User) -> Mapping[str, Any]:
    return {
        "email": user.email,
        "display_name": user.display_name,
        "locale": user.locale,
        "channels": tuple(user.channels),
        "phone": user.phone,
        "push_token": user.push_token,
    }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
