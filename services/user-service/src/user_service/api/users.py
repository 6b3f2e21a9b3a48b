"""``/v1/users``: register, read, look up by email, update, erase."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Header, Query, Response, status
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse

from courier_common.http import ProblemError, problem_responses
from courier_common.logging import get_logger
from courier_common.messaging import new_event_id
from user_service.api.deps import SettingsDep, StoreDep
from user_service.models import User, UserCreate, UserList, UserPatch, normalize_email
from user_service.store import Created, EmailTaken, IdempotentResponse, Replay, UserStore

log = get_logger(__name__)
router = APIRouter(prefix="/v1/users", tags=["users"])

#: Printable ASCII, as the IETF Idempotency-Key draft asks; bounded.
IDEMPOTENCY_KEY = r"^[\x21-\x7e]{1,255}$"
EMAIL_TAKEN = "https://courier.dev/problems/email-taken"
KEY_REUSED = "https://courier.dev/problems/idempotency-key-reused"
MAX_UPDATE_RETRIES = 5


def _not_found() -> ProblemError:
    return ProblemError(status.HTTP_404_NOT_FOUND, "User not found")


def _replay(response: IdempotentResponse) -> JSONResponse:
    headers = {"Idempotent-Replayed": "true"}
    if response.location:
        headers["Location"] = response.location
    media_type = "application/json" if response.status < 400 else "application/problem+json"
    return JSONResponse(
        response.body, status_code=response.status, headers=headers, media_type=media_type
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=User,
    responses=problem_responses(409, 413, 422, 503),
    summary="Register a user",
)
async def register(
    body: UserCreate,
    store: StoreDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            pattern=IDEMPOTENCY_KEY,
            description="Retry-safe key: the same key and body replay the first response.",
        ),
    ] = None,
) -> User | JSONResponse:
    """Create the user and queue ``user.registered``; the broker is not on this path."""
    fingerprint = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    if idempotency_key is not None:
        prior = await store.idempotent_response(idempotency_key)
        if prior is not None:
            return await _replay_or_refuse(store, idempotency_key, prior, fingerprint)
    now = datetime.now(UTC)
    user = User(id=new_event_id(), **body.model_dump(), created_at=now, updated_at=now)
    location = f"/v1/users/{user.id}"
    idempotency = None
    if idempotency_key is not None:
        first = IdempotentResponse(fingerprint, 201, jsonable_encoder(user), location)
        idempotency = (idempotency_key, first)
    result = await store.create(
        user, idempotency=idempotency, idempotency_ttl=settings.idempotency_ttl_seconds
    )
    if isinstance(result, Replay):
        # Found in the same confirmed pipeline as the create: already confirmed.
        return _refuse_or(result.response, fingerprint)
    if isinstance(result, EmailTaken):
        problem = ProblemError(
            status.HTTP_409_CONFLICT,
            "Email already registered",
            "A user with this email address already exists.",
            type=EMAIL_TAKEN,
        )
        if idempotency_key is not None:
            await store.remember_response(
                idempotency_key,
                IdempotentResponse(fingerprint, 409, problem.body()),
                settings.idempotency_ttl_seconds,
            )
        log.info("user_registration_refused", reason="email_taken")
        raise problem
    assert isinstance(result, Created)
    response.headers["Location"] = location
    log.info("user_registered", user_id=str(result.user.id), channels=result.user.channels)
    return result.user


async def _replay_or_refuse(
    store: UserStore, key: str, prior: IdempotentResponse, fingerprint: str
) -> JSONResponse:
    """Replay the first response; a 201 only once the replicas confirm it.

    The first attempt may have been answered 503 because its replicas were late: replaying
    its 201 unconfirmed would give the very promise that 503 withheld.
    """
    if prior.fingerprint == fingerprint and prior.status < 300 and store.durability.enabled:
        prior = await store.confirmed_response(key)
    return _refuse_or(prior, fingerprint)


def _refuse_or(prior: IdempotentResponse, fingerprint: str) -> JSONResponse:
    if prior.fingerprint != fingerprint:
        raise ProblemError(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "Idempotency-Key reused",
            "This Idempotency-Key was used with a different request body.",
            type=KEY_REUSED,
        )
    return _replay(prior)


@router.get(
    "",
    response_model=UserList,
    responses=problem_responses(422),
    summary="Look a user up by exact email",
)
async def find_by_email(
    store: StoreDep,
    email: Annotated[str, Query(min_length=3, max_length=320, description="Exact address")],
) -> UserList:
    try:
        normalized = normalize_email(email)
    except ValueError:
        raise ProblemError(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "Invalid email",
            "The email query parameter is not a valid address.",
        ) from None
    user = await store.find_by_email(normalized)
    return UserList(items=[user] if user else [])


@router.get(
    "/{user_id}", response_model=User, responses=problem_responses(404, 422), summary="Read a user"
)
async def read_user(user_id: UUID, store: StoreDep) -> User:
    stored = await store.get(user_id)
    if stored is None:
        raise _not_found()
    return stored.user


@router.patch(
    "/{user_id}",
    response_model=User,
    responses=problem_responses(404, 409, 413, 422, 503),
    summary="Change display name, locale, channels, phone or push token",
)
async def update_user(user_id: UUID, patch: UserPatch, store: StoreDep) -> User:
    """A JSON merge patch; a change queues ``user.updated``, no change queues nothing."""
    changes = patch.changes()
    for _ in range(MAX_UPDATE_RETRIES):
        stored = await store.get(user_id)
        if stored is None:
            raise _not_found()
        try:
            updated = stored.user.patched(changes, now=datetime.now(UTC))
        except ValueError as exc:
            raise ProblemError(
                status.HTTP_422_UNPROCESSABLE_CONTENT, "Invalid user", str(exc)
            ) from None
        if updated.model_dump(exclude={"updated_at"}) == stored.user.model_dump(
            exclude={"updated_at"}
        ):
            # Nothing to change, maybe because this is the retry of a PATCH answered 503
            # whose change is not yet on the replicas: answer 200 only once it is.
            if not store.durability.enabled:
                return stored.user
            confirmed = await store.confirmed_get(user_id)
            if confirmed is None:
                raise _not_found()
            if confirmed.version == stored.version:
                return confirmed.user
            continue  # it changed meanwhile: look again
        outcome = await store.update(stored, updated)
        if outcome == "ok":
            log.info("user_updated", user_id=str(user_id), changed=sorted(changes))
            return updated
        if outcome == "missing":
            raise _not_found()
    raise ProblemError(
        status.HTTP_409_CONFLICT,
        "Concurrent update",
        "The user kept changing while this update was applied; try again.",
    )


@router.delete(
    "/{user_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=problem_responses(404, 422, 503),
    summary="Erase a user",
)
async def delete_user(user_id: UUID, store: StoreDep) -> Response:
    """Erase the record and release the email; queue ``user.deleted``."""
    stored = await store.get(user_id)
    if stored is None or not await store.delete(stored.user):
        raise _not_found()
    log.info("user_deleted", user_id=str(user_id))
    return Response(status_code=status.HTTP_204_NO_CONTENT)
