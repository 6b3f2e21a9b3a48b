"""The user events: the contract between user-service and the services that consume it.

Payloads carry what a consumer needs to act without calling back (a notifier must not depend
on user-service being up), so ``user.registered`` carries contact details. They are PII: logs
never print them in clear (see :mod:`courier_common.logging`).
"""

from __future__ import annotations

from typing import Literal
from uuid import UUID

from pydantic import Field

from courier_common.messaging.envelope import EventData

Channel = Literal["email", "sms", "push"]
#: Every channel a user can opt into, in the order notifications are attempted.
CHANNELS: tuple[Channel, ...] = ("email", "sms", "push")
#: ``source`` of every event user-service emits (CloudEvents: a URI-reference).
USER_SERVICE_SOURCE = "urn:courier:user-service"


class UserContact(EventData):
    """The user as notifications need it."""

    user_id: UUID
    email: str = Field(min_length=3, max_length=320)
    display_name: str = Field(min_length=1, max_length=200)
    locale: str = Field(min_length=2, max_length=35)
    channels: tuple[Channel, ...] = Field(min_length=1)
    phone: str | None = Field(default=None, max_length=20)
    push_token: str | None = Field(default=None, max_length=4096)


class UserRegistered(UserContact):
    """A user was created; notification-service welcomes them on every chosen channel."""

    event_type = "user.registered"
    event_version = 1


class UserUpdated(UserContact):
    """A user changed. ``previous_channels`` lets a consumer see what was newly enabled."""

    event_type = "user.updated"
    event_version = 1

    previous_channels: tuple[Channel, ...]
    changed: tuple[str, ...] = ()


class UserDeleted(EventData):
    """A user was erased; consumers forget what they hold about them."""

    event_type = "user.deleted"
    event_version = 1

    user_id: UUID


USER_EVENTS: tuple[type[EventData], ...] = (UserRegistered, UserUpdated, UserDeleted)
