"""The user resource: what the API accepts and returns, validated strictly.

Unknown fields are refused (a typo must not be silently ignored); every string has a bound,
checked before any parsing, so a 10,000-character "email" costs nothing.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Self
from uuid import UUID

from email_validator import EmailNotValidError, validate_email
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from courier_common.events import CHANNELS, Channel

_LOCALE = re.compile(
    r"^(?P<lang>[A-Za-z]{2,3})(?:-(?P<script>[A-Za-z]{4}))?(?:-(?P<region>[A-Za-z]{2}|\d{3}))?"
    r"(?P<rest>(?:-(?:[A-Za-z0-9]{5,8}|\d[A-Za-z0-9]{3}))*)$"
)
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def normalize_email(value: str) -> str:
    """Syntax-checked, normalized (IDNA domain, NFC), no DNS lookup."""
    try:
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise ValueError(f"not a valid email address: {exc}") from None


def email_key(email: str) -> str:
    """What uniqueness is decided on: the normalized address, case-folded."""
    return email.casefold()


def normalize_locale(value: str) -> str:
    """A BCP 47 tag in canonical case: ``zh-cn`` -> ``zh-CN``, ``sr-latn-rs`` -> ``sr-Latn-RS``."""
    found = _LOCALE.match(value)
    if not found:
        raise ValueError("not a BCP 47 language tag (e.g. en, en-GB, zh-CN)")
    parts = [found["lang"].lower()]
    if found["script"]:
        parts.append(found["script"].title())
    if found["region"]:
        parts.append(found["region"].upper())
    tag = "-".join(parts)
    return tag + found["rest"].lower() if found["rest"] else tag


def check_phone(value: str) -> str:
    if not _E164.match(value):
        raise ValueError("not an E.164 phone number (e.g. +14155552671)")
    return value


def check_text(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return value


def check_channels(value: list[Channel]) -> list[Channel]:
    if len(set(value)) != len(value):
        raise ValueError("channels must not repeat")
    return sorted(value, key=CHANNELS.index)


Email = Annotated[str, Field(min_length=3, max_length=320), AfterValidator(normalize_email)]
DisplayName = Annotated[
    str, Field(min_length=1, max_length=100, examples=["Ada"]), AfterValidator(check_text)
]
Locale = Annotated[
    str,
    Field(min_length=2, max_length=35, examples=["en", "zh-CN"]),
    AfterValidator(normalize_locale),
]
Channels = Annotated[
    list[Channel], Field(min_length=1, max_length=3), AfterValidator(check_channels)
]
Phone = Annotated[str, Field(max_length=16, examples=["+14155552671"]), AfterValidator(check_phone)]
PushToken = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(check_text)]


def _check_contacts(channels: list[Channel], phone: str | None, push_token: str | None) -> None:
    if "sms" in channels and not phone:
        raise ValueError("phone is required when the sms channel is chosen")
    if "push" in channels and not push_token:
        raise ValueError("push_token is required when the push channel is chosen")


class UserCreate(BaseModel):
    """Registration. Credentials belong to an identity provider: there is no password."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    email: Email
    display_name: DisplayName
    locale: Locale = "en"
    channels: Channels = Field(default_factory=lambda: list[Channel](["email"]))
    phone: Phone | None = None
    push_token: PushToken | None = None

    @model_validator(mode="after")
    def _contacts(self) -> Self:
        _check_contacts(self.channels, self.phone, self.push_token)
        return self


class UserPatch(BaseModel):
    """A JSON merge patch: fields present change, ``null`` clears phone or push_token."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    display_name: DisplayName | None = None
    locale: Locale | None = None
    channels: Channels | None = None
    phone: Phone | None = None
    push_token: PushToken | None = None

    @model_validator(mode="after")
    def _not_null_where_required(self) -> Self:
        for name in ("display_name", "locale", "channels"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self

    def changes(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.model_fields_set}


class User(BaseModel):
    """A registered user."""

    model_config = ConfigDict(frozen=True)

    id: UUID
    email: str
    display_name: str
    locale: str
    channels: list[Channel]
    phone: str | None = None
    push_token: str | None = None
    created_at: datetime
    updated_at: datetime

    def patched(self, changes: dict[str, Any], *, now: datetime) -> User:
        """The user after a merge patch, or ValueError when the result is inconsistent."""
        merged = self.model_copy(update={**changes, "updated_at": now})
        _check_contacts(merged.channels, merged.phone, merged.push_token)
        return merged


class UserList(BaseModel):
    """The answer to a lookup: zero or one user for an exact email."""

    items: list[User]


class StoredUser(BaseModel):
    """The record in Redis: the user plus a version for optimistic concurrency."""

    user: User
    version: int = 1
