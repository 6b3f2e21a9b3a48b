"""The PII policy: what `courier_common.pii` masks, and what it leaves alone."""

from __future__ import annotations

import pytest

from courier_common.pii import mask_email, mask_phone, scrub_text, scrub_value

EMAIL = "alice.smith@example.com"
MASKED_EMAIL = "a***@e***.com"
PHONE = "+14155552671"
MASKED_PHONE = "+1*******671"

# Values that look numeric or hex but are not contact details.
_NOT_PII = {
    "event_id": "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
    "digit_uuid": "12345678-1234-1234-1234-123456789012",
    "uuid4": "550e8400-e29b-41d4-a716-446655440000",
    "occurred_at": "2024-05-01T12:34:56.789012+00:00",
    "occurred_at_z": "2024-05-01T12:34:56Z",
    "spaced_time": "2024-05-01 12:34:56",
    "hex_trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    "digit_trace_id": "12345678901234567890123456789012",
    "digit_span_id": "1234567890123456",
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "message": "processed 1234567 messages in 1500 ms",
    "ratio": "0.123456789",
    "peer": "10.244.120.134:5672",
    "amqp_url": "amqp://guest@rabbitmq:5672/",
}


@pytest.mark.parametrize("text", sorted(_NOT_PII.values()))
def test_scrub_text_returns_non_pii_unchanged(text: str) -> None:
    assert scrub_text(text) is text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"to {EMAIL}.", f"to {MASKED_EMAIL}."),
        (f"call {PHONE}, thanks", f"call {MASKED_PHONE}, thanks"),
        ("call +1 (415) 555-2671 now", f"call {MASKED_PHONE} now"),
        ("phone: 415-555-2671", "phone: *******671"),
        ("sms 415.555.2671", "sms *******671"),
        ("tel:+447911123456", "tel:+4********456"),
        ("bob@mail.example.co.uk", "b***@m***.uk"),
    ],
)
def test_scrub_text_masks_contact_details_in_free_text(text: str, expected: str) -> None:
    assert scrub_text(text) == expected


@pytest.mark.parametrize(
    ("address", "masked"),
    [
        ("alice.smith@example.com", "a***@e***.com"),
        ("bob@mail.example.co.uk", "b***@m***.uk"),
        ("x@y.io", "x***@y***.io"),
        ("  Carol+news@Example.ORG ", "C***@E***.ORG"),
        ("root@localhost", "r***@l***"),
        ("not-an-email", "***"),
    ],
)
def test_mask_email(address: str, masked: str) -> None:
    assert mask_email(address) == masked


@pytest.mark.parametrize(
    ("number", "masked"),
    [
        ("+14155552671", "+1*******671"),
        ("+1 (415) 555-2671", "+1*******671"),
        ("+447911123456", "+4********456"),
        ("4155552671", "*******671"),
        ("415-555-2671", "*******671"),
        ("+1234", "+****"),
    ],
)
def test_mask_phone(number: str, masked: str) -> None:
    assert mask_phone(number) == masked


def test_scrub_value_copies_what_it_masks_and_returns_the_rest_as_is() -> None:
    clean = {"count": 3, "ids": (_NOT_PII["event_id"], _NOT_PII["traceparent"]), "ok": None}
    payload = {"to": [EMAIL], "sms": ("sms", PHONE), "count": 3}

    assert scrub_value(clean) is clean
    assert scrub_value(payload) == {"to": [MASKED_EMAIL], "sms": ("sms", MASKED_PHONE), "count": 3}
    assert payload == {"to": [EMAIL], "sms": ("sms", PHONE), "count": 3}
