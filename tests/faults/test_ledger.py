"""The ledger's arithmetic, without services: what is owed, lost, unexpected and in doubt."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from courier_sinks.http import HttpSink, RecordedRequest
from courier_sinks.smtp import SmtpMessage, SmtpSink
from tests.support.ledger import Ledger


def _answer(status: int, body: dict[str, Any] | None = None) -> httpx.Response:
    return httpx.Response(status, json=body or {})


def _mail(to: str) -> SmtpMessage:
    return SmtpMessage(
        received_at="2026-11-21T00:00:00Z",
        mail_from="courier@example.com",
        rcpt_tos=[to],
        message_id=None,
        subject=None,
        headers={},
        text=None,
        html=None,
        raw_size=1,
        parse_errors=[],
    )


def _sms(to: str) -> RecordedRequest:
    return RecordedRequest(
        received_at="2026-11-21T00:00:00Z",
        method="POST",
        path="/sms",
        query="",
        headers={},
        body={"to": to},
        body_is_json=True,
        status=202,
        id="p-1",
        replay=False,
    )


def test_sends_for_registrations_in_doubt_are_neither_owed_nor_unexpected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Ledger, "dead_letter_users", staticmethod(lambda _url: set()))
    ledger = Ledger("arithmetic")
    created, in_doubt, cut_off, refused = (ledger.new_payload(("email", "sms")) for _ in range(4))
    ledger.record(created, _answer(201, {"id": "u-1"}))
    ledger.record(in_doubt, _answer(503))  # Redis stopped answering: maybe applied
    ledger.record_in_doubt(cut_off)  # the connection broke: maybe applied
    ledger.record(refused, _answer(409))  # definitely not created
    smtp, http = SmtpSink(), HttpSink()
    for payload in (created, in_doubt, cut_off, refused):
        smtp.store.append(_mail(payload["email"]))
    http.store.append(_sms(created["phone"]))
    http.store.append(_sms(in_doubt["phone"]))
    smtp.store.append(_mail("nobody@example.com"))

    tally = ledger.tally(smtp=smtp, http=http, archiver_url="unused")

    assert (tally.accepted, tally.sent, tally.lost) == (2, 2, 0)
    assert tally.in_doubt_sent == 2
    assert sorted(tally.unexpected_keys) == [
        (f"?{refused['email'].lower()}", "email"),
        ("?nobody@example.com", "email"),
    ]
    assert [status for status, _ in ledger.refused] == [503, 409]


def test_an_unsent_welcome_of_a_created_user_is_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Ledger, "dead_letter_users", staticmethod(lambda _url: set()))
    ledger = Ledger("arithmetic")
    ledger.record(ledger.new_payload(("email",)), _answer(201, {"id": "u-2"}))
    tally = ledger.tally(smtp=SmtpSink(), http=HttpSink(), archiver_url="unused")
    assert (tally.lost, tally.lost_keys) == (1, [("u-2", "email")])
