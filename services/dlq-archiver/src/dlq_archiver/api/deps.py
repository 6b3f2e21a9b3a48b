"""Dependencies: the archive, the replayer, and the admin bearer token check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request, status

from courier_common.http import ProblemError
from dlq_archiver.config import Settings
from dlq_archiver.replay import Replayer
from dlq_archiver.store import Archive


def get_archive(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive


def get_replayer(request: Request) -> Replayer:
    """The replayer publishes once the broker is connected; until then replays answer 503."""
    replayer: Replayer = request.app.state.replayer
    if not replayer.ready:
        raise ProblemError(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "Broker unavailable",
            "Not connected to RabbitMQ yet; try again shortly.",
            headers={"Retry-After": "5"},
        )
    return replayer


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def require_admin(
    request: Request,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> None:
    """401 without a bearer token, 403 with the wrong one."""
    settings: Settings = request.app.state.settings
    if not authorization or not authorization.lower().startswith("bearer "):
        raise ProblemError(
            status.HTTP_401_UNAUTHORIZED,
            "Authentication required",
            "This needs the admin bearer token.",
            headers={"WWW-Authenticate": 'Bearer realm="dlq-archiver"'},
        )
    token = authorization[7:].strip().encode()
    if not hmac.compare_digest(token, settings.admin_token.get_secret_value().encode()):
        raise ProblemError(status.HTTP_403_FORBIDDEN, "Forbidden", "The token is not valid.")


def is_admin(
    request: Request,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> bool:
    """Whether the request carries the admin token (for reveal=true), checked the same way."""
    if authorization is None:
        return False
    require_admin(request, authorization)
    return True


ArchiveDep = Annotated[Archive, Depends(get_archive)]
ReplayerDep = Annotated[Replayer, Depends(get_replayer)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
AdminDep = Annotated[None, Depends(require_admin)]
IsAdminDep = Annotated[bool, Depends(is_admin)]
