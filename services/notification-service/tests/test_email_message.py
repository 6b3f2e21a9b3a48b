"""The email as it goes on the wire: built with the cached header classes, it is byte for byte
what the standard library's default policy makes (boundary and Date aside)."""

from __future__ import annotations

import re
from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest
from aiosmtplib.email import flatten_message

from notification_service import senders

HEADERS = {
    "From": "Courier <noreply@courier.example>",
    "To": "ada.lovelace+p123@example.com",
    "Message-ID": "<0193a8f0-0000-7000-8000-000000000001.email@courier.example>",
    "Date": "Sat, 21 Nov 2026 11:50:02 +0000",
}
SUBJECTS = ["Welcome to Courier, Ada", "欢迎来到 Courier，阿达", "A" * 200 + " long subject folds"]


def _reference(headers: dict[str, str], text: str, html: str, locale: str) -> EmailMessage:
    message = EmailMessage()  # policy.default, the registry that builds a class per header
    for name, value in headers.items():
        message[name] = value
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    message["Content-Language"] = locale
    return message


def _comparable(raw: bytes) -> bytes:
    return re.sub(rb"={15}\d+==", b"BOUNDARY", raw)


@pytest.mark.parametrize("subject", SUBJECTS)
def test_same_bytes_as_the_default_policy(subject: str) -> None:
    headers = {**HEADERS, "Subject": subject}
    text, html = "Hello Ada,\n\nwelcome. 你好\n", "<p>Hello Ada, welcome. 你好</p>\n"
    ours = flatten_message(senders._email_message(headers, text, html, "zh-Hans"))
    theirs = flatten_message(_reference(headers, text, html, "zh-Hans"))
    assert _comparable(ours) == _comparable(theirs)
    parsed = message_from_bytes(ours, policy=policy.default)
    assert parsed["Subject"] == subject
    assert parsed["Content-Language"] == "zh-Hans"


def test_header_injection_is_still_refused() -> None:
    headers = {**HEADERS, "Subject": "hi\r\nBcc: victim@example.com"}
    with pytest.raises(ValueError, match=r"linefeed|carriage return|newline"):
        senders._email_message(headers, "t", "<p>t</p>", "en")


def test_header_classes_are_built_once() -> None:
    registry = senders.EMAIL_POLICY.header_factory
    assert isinstance(registry, senders._HeaderClasses)
    assert registry["Subject"] is registry["subject"]
    assert registry["To"] is registry["TO"]
