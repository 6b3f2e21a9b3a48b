"""The SMTP sink, driven by a real SMTP client (aiosmtplib) over a real socket."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import make_msgid
from pathlib import Path

import aiosmtplib
import httpx
import pytest

from courier_sinks import SinkControl, SmtpSink
from courier_sinks.mail import parse_mail, parse_mail_headers


def _plain(to: str = "ada@example.com", subject: str = "Welcome") -> EmailMessage:
    message = EmailMessage()
    message["From"] = "Courier <noreply@courier.test>"
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain="courier.test")
    message.set_content("Hello Ada,\nwelcome aboard.\n")
    return message


# Real Chinese text, full-width punctuation included: exactly what must survive the round trip.
SUBJECT_ZH = "欢迎加入 Courier，李雷！"  # noqa: RUF001
TEXT_ZH = "你好，李雷：\n欢迎加入。\n"
HTML_ZH = "<p>你好，<b>李雷</b>：欢迎加入。</p>\n"


def _chinese_alternative() -> EmailMessage:
    """multipart/alternative, Chinese subject (RFC 2047) and bodies (base64 and QP)."""
    message = EmailMessage()
    message["From"] = "Courier <noreply@courier.test>"
    message["To"] = "李雷 <li.lei@example.cn>"
    message["Subject"] = SUBJECT_ZH
    message["Message-ID"] = "<user.registered.0192f5a1@courier.test>"
    message.set_content(TEXT_ZH, cte="base64")
    message.add_alternative(HTML_ZH, subtype="html", cte="quoted-printable")
    return message


async def send(sink: SmtpSink, message: EmailMessage) -> None:
    await aiosmtplib.send(message, hostname="127.0.0.1", port=sink.port, timeout=10)


async def test_plain_message_is_stored_as_one_json_line(smtp_sink: SmtpSink) -> None:
    message = _plain()
    await send(smtp_sink, message)

    [stored] = smtp_sink.messages
    assert stored["mail_from"] == "noreply@courier.test"
    assert stored["rcpt_tos"] == ["ada@example.com"]
    assert stored["message_id"] == message["Message-ID"]
    assert stored["subject"] == "Welcome"
    assert stored["text"] == "Hello Ada,\nwelcome aboard.\n"
    assert stored["html"] is None
    assert stored["headers"]["from"] == "Courier <noreply@courier.test>"
    assert stored["headers"]["to"] == "ada@example.com"
    assert stored["raw_size"] == len(message.as_bytes(policy=SMTP))  # CRLF on the wire
    assert stored["parse_errors"] == []
    received = dt.datetime.fromisoformat(stored["received_at"])
    assert received.tzinfo == dt.UTC
    assert abs(dt.datetime.now(dt.UTC) - received) < dt.timedelta(seconds=10)

    assert smtp_sink.store_path is not None
    lines = smtp_sink.store_path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [stored]


async def test_chinese_multipart_alternative_is_decoded(
    smtp_sink: SmtpSink, smtp_control: SinkControl
) -> None:
    message = _chinese_alternative()
    wire = message.as_bytes()
    assert "欢迎".encode() not in wire  # the test really exercises RFC 2047, base64 and QP
    assert b"Content-Transfer-Encoding: base64" in wire
    assert b"Content-Transfer-Encoding: quoted-printable" in wire

    await send(smtp_sink, message)

    [stored] = smtp_control.messages()
    assert stored["message_id"] == "<user.registered.0192f5a1@courier.test>"
    assert stored["subject"] == SUBJECT_ZH
    assert stored["headers"]["subject"] == SUBJECT_ZH
    assert stored["headers"]["to"] == "李雷 <li.lei@example.cn>"
    assert stored["headers"]["content-type"].startswith("multipart/alternative")
    assert stored["text"] == TEXT_ZH
    assert stored["html"] == HTML_ZH
    assert stored["rcpt_tos"] == ["li.lei@example.cn"]
    # The file holds the same record, with the Chinese text readable as is.
    assert smtp_sink.store_path is not None
    content = smtp_sink.store_path.read_text(encoding="utf-8")
    assert "欢迎加入 Courier" in content
    assert json.loads(content) == stored


async def test_smtputf8_recipient_and_several_recipients(smtp_sink: SmtpSink) -> None:
    message = _plain(to="用户@例子.测试, bob@example.com")
    await send(smtp_sink, message)
    [stored] = smtp_sink.messages
    assert stored["rcpt_tos"] == ["用户@例子.测试", "bob@example.com"]
    assert stored["headers"]["to"] == "用户@例子.测试, bob@example.com"


async def test_451_twice_then_accepted(smtp_sink: SmtpSink) -> None:
    smtp_sink.fail_next(2, 451, "4.3.0 try again later")
    message = _plain()

    for attempt in (1, 2):
        with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
            await send(smtp_sink, message)
        assert refused.value.code == 451, attempt
        assert refused.value.message == "4.3.0 try again later"
        assert smtp_sink.messages == []
    assert smtp_sink.failure == {
        "armed": False,
        "remaining": 0,
        "used": 2,
    }

    await send(smtp_sink, message)
    [stored] = smtp_sink.messages
    assert stored["message_id"] == message["Message-ID"]


async def test_550_through_the_control_api(smtp_sink: SmtpSink, smtp_control: SinkControl) -> None:
    state = smtp_control.fail_next(1, code=550, message="5.1.1 mailbox unavailable")
    assert state == {
        "armed": True,
        "remaining": 1,
        "used": 0,
        "code": 550,
        "message": "5.1.1 mailbox unavailable",
    }

    with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
        await send(smtp_sink, _plain())
    assert refused.value.code == 550
    assert refused.value.message == "5.1.1 mailbox unavailable"
    assert smtp_control.failure()["armed"] is False

    await send(smtp_sink, _plain())
    assert len(smtp_control.messages()) == 1


async def test_failure_switch_can_be_disarmed(
    smtp_sink: SmtpSink, smtp_control: SinkControl
) -> None:
    smtp_control.fail_next(5, code=421)
    assert smtp_control.failure()["message"].startswith("4.3.0")
    smtp_control.clear_failures()
    await send(smtp_sink, _plain())
    assert len(smtp_sink.messages) == 1


async def test_filter_by_recipient_and_clear(
    smtp_sink: SmtpSink, smtp_control: SinkControl
) -> None:
    await send(smtp_sink, _plain(to="ada@example.com"))
    await send(smtp_sink, _plain(to="bob@example.com"))

    assert [m["rcpt_tos"] for m in smtp_control.messages(to="BOB@example.com")] == [
        ["bob@example.com"]
    ]
    assert smtp_control.messages(to="nobody@example.com") == []
    assert len(smtp_sink.wait_for_messages(1, to="ada@example.com", timeout=1)) == 1

    smtp_control.clear()
    assert smtp_control.messages() == []
    assert smtp_sink.messages == []
    assert smtp_sink.store_path is not None
    assert smtp_sink.store_path.read_text(encoding="utf-8") == ""
    assert smtp_control.healthz() == {
        "status": "ok",
        "kind": "smtp",
        "records": "messages",
        "count": 0,
    }


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"count": 1, "code": 250}, "code must be an integer from 400 to 599"),
        ({"count": 1}, "code is required"),
        ({"count": 0, "code": 451}, "count must be"),
        ({"count": 1, "code": 451, "status": 503}, "unknown field(s) ['status']"),
        ({"count": 1, "code": 451, "message": "two\r\nlines"}, "single line"),
    ],
)
def test_invalid_failure_specs_are_refused(
    smtp_sink: SmtpSink, body: dict[str, object], reason: str
) -> None:
    response = httpx.post(f"{smtp_sink.control_url}/_sink/fail", json=body)
    assert response.status_code == 422
    assert reason in response.json()["message"]
    assert smtp_sink.failure["armed"] is False


def test_fail_next_validates_like_the_api(smtp_sink: SmtpSink) -> None:
    with pytest.raises(ValueError, match="400 to 599"):
        smtp_sink.fail_next(1, 200)


def test_sink_without_store_or_control(tmp_path: object) -> None:
    with SmtpSink() as sink:
        assert sink.store_path is None
        assert sink.control_url is None
        assert sink.port > 0


def test_busy_port_fails_start(smtp_sink: SmtpSink) -> None:
    with pytest.raises(OSError, match="in use"):
        SmtpSink("127.0.0.1", smtp_sink.port).start()


# --------------------------------------------------------------------------------------------
# A slow relay: delay_ms
# --------------------------------------------------------------------------------------------


async def test_delay_answers_late_without_holding_up_other_sessions() -> None:
    delay = 1.5
    with SmtpSink(delay_ms=int(delay * 1000)) as sink:
        started = time.monotonic()
        slow = asyncio.create_task(send(sink, _plain(to="ada@example.com")))
        # Long enough for the first session to be inside its delay (it needs milliseconds).
        await asyncio.sleep(0.3)

        other = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, timeout=10)
        await other.connect()
        await other.ehlo()
        code, _ = await other.noop()
        await other.quit()

        # A whole other dialogue happened while the first message still waits for its answer,
        # and the waiting message is not stored yet: it is stored when it is answered.
        assert code == 250
        assert not slow.done()
        assert sink.messages == []

        await slow
        assert time.monotonic() - started >= delay
        assert [m["rcpt_tos"] for m in sink.messages] == [["ada@example.com"]]


async def test_delayed_sessions_wait_side_by_side() -> None:
    delay = 1.0
    with SmtpSink(delay_ms=int(delay * 1000)) as sink:
        started = time.monotonic()
        await asyncio.gather(*(send(sink, _plain(to=f"user{i}@example.com")) for i in range(3)))
        elapsed = time.monotonic() - started
        assert len(sink.messages) == 3
    assert elapsed >= delay
    assert elapsed < 2 * delay  # one after the other would take 3 delays


async def test_a_delayed_sink_is_slow_to_refuse_too() -> None:
    with SmtpSink(delay_ms=200) as sink:
        sink.fail_next(1, 451)
        started = time.monotonic()
        with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
            await send(sink, _plain())
        assert refused.value.code == 451
        assert time.monotonic() - started >= 0.2
        assert sink.messages == []


@pytest.mark.parametrize("delay_ms", [-1, 600_001, 1.5, True, "10"])
def test_delay_ms_is_validated(delay_ms: object) -> None:
    with pytest.raises(ValueError, match="delay_ms must be"):
        SmtpSink(delay_ms=delay_ms)  # type: ignore[arg-type]


def test_delay_ms_bounds_are_accepted() -> None:
    assert SmtpSink(delay_ms=0).delay_ms == 0
    assert SmtpSink(delay_ms=600_000).delay_ms == 600_000


# --------------------------------------------------------------------------------------------
# A cheap relay: parse=False keeps lean records
# --------------------------------------------------------------------------------------------


async def test_lean_records(tmp_path: Path) -> None:
    with SmtpSink(store_path=tmp_path / "smtp.jsonl", control_port=0, parse=False) as sink:
        assert sink.parse is False
        chinese = _chinese_alternative()
        await send(sink, chinese)
        for _ in range(2):
            await send(sink, _plain(to="bob@example.com", subject="Hi Bob"))

        first, *_ = sink.messages
        assert first == {
            "received_at": first["received_at"],
            "mail_from": "noreply@courier.test",
            "rcpt_tos": ["li.lei@example.cn"],
            "message_id": "<user.registered.0192f5a1@courier.test>",
            "subject": SUBJECT_ZH,  # RFC 2047 undone, as in a full record
            "headers": {},
            "text": None,
            "html": None,
            "raw_size": len(chinese.as_bytes(policy=SMTP)),
            "parse_errors": [],
        }
        assert dt.datetime.fromisoformat(first["received_at"]).tzinfo == dt.UTC

        assert sink.control_url is not None
        with SinkControl(sink.control_url) as control:
            assert control.healthz()["count"] == 3
            bobs = control.messages(to="Bob@example.com")
            assert [(m["rcpt_tos"], m["subject"]) for m in bobs] == [
                (["bob@example.com"], "Hi Bob"),
                (["bob@example.com"], "Hi Bob"),
            ]
            assert control.messages(to="li.lei@example.cn") == [first]
        assert len(sink.wait_for_messages(2, to="bob@example.com", timeout=1)) == 2
        lines = (tmp_path / "smtp.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == sink.messages


@pytest.mark.parametrize(
    "raw",
    [
        _plain().as_bytes(policy=SMTP),
        _chinese_alternative().as_bytes(policy=SMTP),
        "Subject: =?utf-8?b?5qyi6L+O?= and =?iso-8859-1?q?caf=E9?=\r\nX-Raw: 原始\r\n\r\n".encode(),
        "Subject: 原始, raw UTF-8\r\nMessage-ID: <a@b>\r\n\r\nSubject: in the body\r\n".encode(),
        b"Subject: a folded\r\n subject\r\nReceived: x\r\n\r\n",
        b"Subject: one\r\nSubject: two\r\n\r\n",
        b"Subject: bare LF line ends\nMessage-ID: <lf@x>\n\nbody\n",
        b"Subject: headers only, no blank line",
        b"\r\nSubject: no headers, this is the body\r\n",
    ],
)
def test_lean_parse_agrees_with_the_full_one(raw: bytes) -> None:
    full, lean = parse_mail(raw), parse_mail_headers(raw)
    assert (lean["message_id"], lean["subject"]) == (full["message_id"], full["subject"])
    assert (lean["headers"], lean["text"], lean["html"], lean["parse_errors"]) == (
        {},
        None,
        None,
        [],
    )


def test_lean_parse_keeps_what_it_cannot_decode() -> None:
    lean = parse_mail_headers(b"Subject: =?x-no-such-charset?q?caf=E9?=\r\n\r\n")
    assert lean["subject"] == "=?x-no-such-charset?q?caf=E9?="
    assert lean["parse_errors"] == []


# --------------------------------------------------------------------------------------------
# Parsing of what senders other than Python's email package produce
# --------------------------------------------------------------------------------------------


def test_raw_utf8_without_charset_and_encoded_words() -> None:
    raw = (
        "From: a@example.com\r\n"
        "Subject: =?utf-8?b?5qyi6L+O?= and =?iso-8859-1?q?caf=E9?=\r\n"
        "X-Raw: 原始\r\n"
        "\r\n"
        "正文 without a charset\r\n"
    ).encode()
    parsed = parse_mail(raw)
    assert parsed["subject"] == "欢迎 and café"
    assert parsed["headers"]["x-raw"] == "原始"
    assert parsed["text"] == "正文 without a charset\n"
    assert parsed["message_id"] is None


def test_latin1_quoted_printable_and_unknown_charset() -> None:
    raw = (
        b"Subject: mixed\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/alternative; boundary="b"\r\n'
        b"\r\n"
        b"--b\r\n"
        b"Content-Type: text/plain; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n"
        b"\r\n"
        b"Gr=FC=DFe\r\n"
        b"--b\r\n"
        b"Content-Type: text/html; charset=x-no-such-charset\r\n"
        b"\r\n"
        b"<p>ok</p>\r\n"
        b"--b--\r\n"
    )
    parsed = parse_mail(raw)
    # The line end before a boundary belongs to the boundary (RFC 2046), not to the part.
    assert parsed["text"] == "Grüße"
    assert parsed["html"] == "<p>ok</p>"


def test_repeated_headers_are_joined() -> None:
    parsed = parse_mail(b"Received: one\r\nReceived: two\r\nSubject: x\r\n\r\nbody\r\n")
    assert parsed["headers"]["received"] == "one, two"
