"""The envelope codec: what round-trips, and the one error (with a reason) for the rest."""

from __future__ import annotations

import gc
import json
import weakref
from datetime import UTC, datetime

import pytest

from courier_common.messaging.envelope import EnvelopeError, EventCatalog, event_model, new_event
from courier_testing.events import Pinged


class PingedV2(Pinged):
    event_version = 2


CATALOG = EventCatalog([Pinged], max_body_bytes=4096)


def valid_document() -> dict[str, object]:
    document: dict[str, object] = json.loads(new_event(Pinged(n=1), source="tests").encode())
    return document


def test_round_trip_keeps_every_attribute() -> None:
    event = new_event(Pinged(n=7, note="héllo"), source="urn:courier:tests")
    decoded = CATALOG.decode(event.encode(), content_type="application/json")
    assert decoded == event
    assert decoded.data == Pinged(n=7, note="héllo")
    assert decoded.specversion == "1.0"
    assert decoded.id.version == 7
    assert decoded.type == "test.pinged"
    assert decoded.time.tzinfo is not None


def test_event_ids_sort_by_creation_time() -> None:
    ids = [new_event(Pinged(n=i), source="t").id for i in range(50)]
    assert ids == sorted(ids, key=lambda u: u.bytes)


def test_content_type_parameters_are_accepted() -> None:
    body = new_event(Pinged(n=1), source="t").encode()
    assert CATALOG.decode(body, content_type="application/json; charset=utf-8").data.n == 1


def decode_error(body: bytes, content_type: str | None = "application/json") -> str:
    with pytest.raises(EnvelopeError) as info:
        CATALOG.decode(body, content_type=content_type)
    assert info.value.reason == str(info.value)
    return info.value.reason


def with_changes(**changes: object) -> bytes:
    document = valid_document()
    for key, value in changes.items():
        if value is None:
            document.pop(key)
        else:
            document[key] = value
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (b"\xff\xfe\x00garbage", "application/json", "not UTF-8"),
        (b"{not json", "application/json", "not valid JSON"),
        (b"[1, 2]", "application/json", "JSON list, not an object"),
        (with_changes(), "text/plain", "content type 'text/plain' is not application/json"),
        (with_changes(), None, "content type none is not application/json"),
        (with_changes(id=None), "application/json", "missing required attribute 'id'"),
        (with_changes(id="not-a-uuid"), "application/json", "invalid 'id'"),
        (with_changes(type="user.exploded"), "application/json", "unknown event type"),
        (with_changes(version=9), "application/json", "unknown version 9 of 'test.pinged'"),
        (with_changes(specversion="0.3"), "application/json", "invalid 'specversion'"),
        (with_changes(time="yesterday"), "application/json", "invalid 'time'"),
        (with_changes(time="2026-01-01T00:00:00"), "application/json", "invalid 'time'"),
        (with_changes(data={"n": "x"}), "application/json", "data does not match"),
        (with_changes(data={"n": 1, "x": 2}), "application/json", "unexpected attribute 'x'"),
        (b"[" * 2000 + b"]" * 2000, "application/json", "nested too deeply"),
        (b" " * 5000, "application/json", "exceeds the limit of 4096 bytes"),
    ],
)
def test_invalid_messages_raise_one_error_with_a_reason(
    body: bytes, content_type: str | None, reason: str
) -> None:
    assert reason in decode_error(body, content_type)


def test_unknown_version_lists_the_known_ones() -> None:
    catalog = EventCatalog([Pinged, PingedV2])
    body = with_changes(version=3)
    with pytest.raises(EnvelopeError, match=r"known: 1, 2"):
        catalog.decode(body, content_type="application/json")


def test_extension_attributes_are_tolerated() -> None:
    body = with_changes(traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    assert CATALOG.decode(body, content_type="application/json").data.n == 1


def test_registering_two_models_for_one_version_is_refused() -> None:
    class Other(Pinged):
        pass

    with pytest.raises(ValueError, match="registered twice"):
        EventCatalog([Pinged, Other])


def test_new_event_uses_given_id_and_time() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    event = new_event(Pinged(n=1), source="s", time=when)
    assert event.time == when
    assert event.version == 1


def test_the_event_model_of_a_data_type_survives_garbage_collection() -> None:
    """pydantic keeps parametrized generics weakly; rebuilding one per event cost a tenth of
    a registration's CPU. Encoding and decoding reuse one class per data type."""
    first = weakref.ref(type(new_event(Pinged(n=1), source="test")))
    gc.collect()
    kept = first()
    assert kept is not None, "Event[Pinged] was freed: the next event rebuilds it"
    assert type(new_event(Pinged(n=2), source="test")) is kept is event_model(Pinged)
    body = new_event(Pinged(n=3), source="test").encode()
    assert type(EventCatalog([Pinged]).decode(body, content_type="application/json")) is kept
