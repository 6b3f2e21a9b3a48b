"""The event envelope: CloudEvents 1.0 attribute names in a JSON body, decoded strictly.

Anything that is not a valid envelope of a known type and version raises one error,
:class:`EnvelopeError`, whose ``reason`` is a sentence an operator can act on. The consumer
runner turns it into a dead letter on first delivery: a bad message is never retried and
never crashes a worker.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Final, Generic, Literal, TypeVar, Union, cast
from uuid import UUID

import uuid_utils
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
)

CONTENT_TYPE: Final = "application/json"
SPEC_VERSION: Final = "1.0"
#: Largest body the decoder reads; anything larger is refused before parsing.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024


class EnvelopeError(ValueError):
    """A message that is not a valid envelope of a known type and version (permanent)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EventData(BaseModel):
    """Base of every event payload; each subclass names its type and schema version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_type: ClassVar[str]
    event_version: ClassVar[int] = 1


D = TypeVar("D", bound=EventData)


class Event(BaseModel, Generic[D]):
    """One event as it travels: envelope attributes plus the typed payload in ``data``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    specversion: Literal["1.0"] = SPEC_VERSION
    id: UUID
    source: str = Field(min_length=1, max_length=512)
    type: str = Field(min_length=1, max_length=256)
    time: AwareDatetime
    datacontenttype: Literal["application/json"] = CONTENT_TYPE
    version: int = Field(ge=1)
    data: D

    def encode(self) -> bytes:
        """The wire form: compact JSON, UTF-8."""
        return self.model_dump_json().encode()


class _RawEnvelope(BaseModel):
    """The envelope before its payload is known; extension attributes are tolerated."""

    model_config = ConfigDict(extra="ignore")

    specversion: Literal["1.0"]
    id: UUID
    source: str = Field(min_length=1, max_length=512)
    type: str = Field(min_length=1, max_length=256)
    time: AwareDatetime
    datacontenttype: Literal["application/json"] = CONTENT_TYPE
    version: int = Field(ge=1)
    data: dict[str, Any]


@functools.cache
def event_model(data_type: type[EventData]) -> Any:
    """``Event[data_type]``, built once per data type and kept.

    pydantic caches parametrized generics only weakly, and a parametrized model class lives in
    reference cycles: each garbage collection freed it, and the next event rebuilt it (schema
    and validator included) — a tenth of user-service's CPU per registration.
    """
    return Event[data_type]  # type: ignore[valid-type]


def new_event_id() -> UUID:
    """A UUIDv7: unique, and sortable by creation time."""
    return UUID(str(uuid_utils.uuid7()))


def new_event(
    data: D,
    *,
    source: str,
    event_id: UUID | None = None,
    time: datetime | None = None,
) -> Event[D]:
    """Wrap ``data`` in an envelope with a fresh UUIDv7 id and the current time."""
    model = event_model(type(data))
    return cast(
        Event[D],
        model(
            id=event_id or new_event_id(),
            source=source,
            type=data.event_type,
            time=time or datetime.now(UTC),
            version=data.event_version,
            data=data,
        ),
    )


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"]) or "body"
    if err["type"] == "missing":
        return f"missing required attribute '{where}'"
    if err["type"] == "extra_forbidden":
        return f"unexpected attribute '{where}'"
    return f"invalid '{where}': {err['msg']}"


def _tag(event_type: str, version: object) -> str:
    return f"{event_type}\x00{version}"


def _tag_of(value: Any) -> str | None:
    """The union member for a parsed envelope: its (type, version), or None (no member)."""
    if isinstance(value, dict):
        return _tag(value.get("type", ""), value.get("version"))
    return None


class EventCatalog:
    """The event types and versions a consumer understands, and the strict decoder."""

    def __init__(
        self,
        models: Iterable[type[EventData]] = (),
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.max_body_bytes = max_body_bytes
        self._models: dict[tuple[str, int], type[EventData]] = {}
        self._adapter: TypeAdapter[Any] | None = None
        for model in models:
            self.register(model)

    def register(self, model: type[EventData]) -> None:
        key = (model.event_type, model.event_version)
        if key in self._models and self._models[key] is not model:
            raise ValueError(f"{model.event_type} v{model.event_version} is registered twice")
        self._models[key] = model
        self._adapter = None

    def _one_pass(self) -> TypeAdapter[Any]:
        """Every known ``Event[D]``, told apart by (type, version): one pydantic pass from bytes.

        JSON is parsed and validated in pydantic's core in one go; the step-by-step decoder
        below only runs for a body this refuses, to say exactly why.
        """
        if self._adapter is None:
            members = tuple(
                Annotated[event_model(model), Tag(_tag(event_type, version))]
                for (event_type, version), model in self._models.items()
            )
            if len(members) == 1:
                members = (*members, *members)  # a Union needs two; the same tag twice is fine
            union: Any = Annotated[Union[members], Discriminator(_tag_of)]  # noqa: UP007
            self._adapter = TypeAdapter(union)
        return self._adapter

    @property
    def types(self) -> frozenset[str]:
        return frozenset(event_type for event_type, _ in self._models)

    def decode(self, body: bytes, *, content_type: str | None) -> Event[Any]:
        """Decode one message body, or raise :class:`EnvelopeError` with the reason."""
        if len(body) > self.max_body_bytes:
            raise EnvelopeError(
                f"body of {len(body)} bytes exceeds the limit of {self.max_body_bytes} bytes"
            )
        media_type = (content_type or "").split(";", 1)[0].strip().lower()
        if media_type != CONTENT_TYPE:
            shown = repr(content_type) if content_type else "none"
            raise EnvelopeError(f"content type {shown[:80]} is not {CONTENT_TYPE}")
        if self._models:
            try:
                event = cast(Event[Any], self._one_pass().validate_json(body))
            except ValidationError:
                pass  # the step-by-step decoder says why
            else:
                # Event fills in specversion for new events; on the wire it is required.
                if "specversion" in event.model_fields_set:
                    return event
        return self._decode_steps(body)

    def _decode_steps(self, body: bytes) -> Event[Any]:
        """The decoder one step at a time, each refusal with its own reason."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EnvelopeError(f"body is not UTF-8 text (byte {exc.start})") from None
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise EnvelopeError(f"body is not valid JSON: {exc}") from None
        except RecursionError:
            raise EnvelopeError("body is JSON nested too deeply") from None
        if not isinstance(document, Mapping):
            raise EnvelopeError(f"body is a JSON {type(document).__name__}, not an object")
        try:
            raw = _RawEnvelope.model_validate(document)
        except ValidationError as exc:
            raise EnvelopeError(_first_error(exc)) from None
        model = self._models.get((raw.type, raw.version))
        if model is None:
            known = sorted(v for t, v in self._models if t == raw.type)
            if not known:
                raise EnvelopeError(f"unknown event type '{raw.type[:100]}'")
            raise EnvelopeError(
                f"unknown version {raw.version} of '{raw.type}' (known: "
                + ", ".join(str(v) for v in known)
                + ")"
            )
        try:
            data = model.model_validate(raw.data)
        except ValidationError as exc:
            raise EnvelopeError(
                f"data does not match {raw.type} v{raw.version}: {_first_error(exc)}"
            ) from None
        return event_model(model)(  # type: ignore[no-any-return]
            id=raw.id,
            source=raw.source,
            type=raw.type,
            time=raw.time,
            version=raw.version,
            data=data,
        )
