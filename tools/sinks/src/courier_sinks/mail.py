"""Turning the bytes of one accepted email into what a test wants to assert on.

A test of Courier's email channel asks "did Ada get a welcome mail, in Chinese, with this
Message-ID?", not "what were the bytes". So the record holds decoded text: the subject and
headers with RFC 2047 encoded words undone, and the text and HTML bodies with base64 or
quoted-printable undone and the charset applied.

Parsing never refuses a message: the sink stands in for a mail server, which accepts what
the protocol allows. Anything the parser chokes on is kept as best it can be decoded, with
the problem noted in ``parse_errors``.

That full parse (`parse_mail`) costs milliseconds of CPU per message — more than the service
under test spends sending it — so a sink that only has to count and time messages (the
benchmark) uses `parse_mail_headers` instead: Message-ID and Subject from a scan of the header
block, nothing else.
"""

from __future__ import annotations

import re
from email import policy
from email.header import decode_header, make_header
from email.message import EmailMessage, Message
from email.parser import BytesParser
from typing import TypedDict

__all__ = ["ParsedMail", "parse_mail", "parse_mail_headers"]


class ParsedMail(TypedDict):
    """The parts of an `SmtpMessage` that come from the message itself."""

    message_id: str | None
    subject: str | None
    headers: dict[str, str]
    text: str | None
    html: str | None
    parse_errors: list[str]


def _clean(value: str) -> str:
    """Undo the surrogate escapes the parser leaves for raw 8-bit bytes, as UTF-8.

    Raw UTF-8 in headers is legal with SMTPUTF8, and JSON cannot hold lone surrogates.
    """
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _header_text(message: EmailMessage, name: str, raw: str, errors: list[str]) -> str:
    try:
        values = message.get_all(name) or [raw]
        return ", ".join(_clean(str(value)) for value in values)
    except Exception as exc:  # the header parser has crashed on malformed addresses before
        errors.append(f"header {name}: {type(exc).__name__}: {exc}")
        try:
            return _clean(str(make_header(decode_header(raw))))
        except Exception:
            return _clean(raw)


def _decoded_headers(message: EmailMessage, errors: list[str]) -> dict[str, str]:
    """Every header, names lower-cased, decoded; a repeated header's values joined by ", "."""
    headers: dict[str, str] = {}
    for name, raw in message.raw_items():
        key = name.lower()
        if key not in headers:
            headers[key] = _header_text(message, name, raw, errors)
    return headers


def _part_text(part: Message) -> str:
    """A text part's content: transfer encoding undone, then its charset, else UTF-8.

    UTF-8 is also tried when the declared charset fails, because senders that put 8-bit text
    in a part labelled us-ascii (or nothing, which means us-ascii) nearly always meant UTF-8.
    Line ends come back as ``\\n``, as the sender wrote them before SMTP made them CRLF.
    """
    payload = part.get_payload(decode=True)
    data = payload if isinstance(payload, bytes) else b""
    text: str | None = None
    for charset in (part.get_content_charset(), "utf-8"):
        if charset is None:
            continue
        try:
            text = data.decode(charset)
            break
        except (LookupError, UnicodeDecodeError):
            continue
    if text is None:
        text = data.decode("utf-8", "replace")
    return text.replace("\r\n", "\n")


def _body(message: EmailMessage, subtype: str, errors: list[str]) -> str | None:
    try:
        part = message.get_body(preferencelist=(subtype,))
    except Exception as exc:
        errors.append(f"{subtype} body: {type(exc).__name__}: {exc}")
        return None
    return None if part is None else _part_text(part)


def parse_mail(raw: bytes) -> ParsedMail:
    """Decode *raw* (the DATA of one SMTP transaction) into subject, headers and bodies.

    ``text`` is the text/plain body and ``html`` the text/html one, each None when absent;
    for multipart/alternative both are there. Attachments are not bodies and are left out.
    """
    errors: list[str] = []
    message = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)  # guaranteed by policy.default
    headers = _decoded_headers(message, errors)
    errors.extend(f"defect: {type(defect).__name__}" for defect in message.defects)
    return ParsedMail(
        message_id=headers.get("message-id"),
        subject=headers.get("subject"),
        headers=headers,
        text=_body(message, "plain", errors),
        html=_body(message, "html", errors),
        parse_errors=errors,
    )


# The blank line that ends the header block (CRLF on the wire; a bare LF is tolerated).
_HEADER_END = re.compile(rb"\r?\n\r?\n")
# A line end followed by whitespace is a fold (RFC 5322 2.2.3): unfolding removes the line end.
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_LEAN_HEADERS = ("message-id", "subject")


def _decode_words(value: str) -> str:
    """*value* with RFC 2047 encoded words undone; as is when there are none or they are bad."""
    if "=?" not in value:
        return value
    try:
        return _clean(str(make_header(decode_header(value))))
    except Exception:
        return value


def parse_mail_headers(raw: bytes) -> ParsedMail:
    """The lean parse: ``message_id`` and ``subject`` only, from the header block of *raw*.

    Tens of microseconds where `parse_mail` takes milliseconds. The header block (up to the
    first blank line) is read as UTF-8 and unfolded, and only those two headers are kept, the
    subject with RFC 2047 encoded words undone (left as is when they cannot be); a repeated
    one has its values joined by ", ", as `parse_mail` does. ``headers`` is empty, ``text``
    and ``html`` None, ``parse_errors`` empty: nothing is parsed that could fail.
    """
    if raw.startswith((b"\r\n", b"\n")):
        block = b""  # no headers at all: the message starts with its body
    else:
        end = _HEADER_END.search(raw)
        block = raw if end is None else raw[: end.start()]
    found: dict[str, list[str]] = {}
    for line in _FOLD.sub("", block.decode("utf-8", "replace")).split("\n"):
        name, colon, value = line.partition(":")
        key = name.lower()
        if colon and key in _LEAN_HEADERS:
            found.setdefault(key, []).append(_decode_words(value.strip(" \t\r")))
    message_id, subject = (", ".join(found[key]) if key in found else None for key in _LEAN_HEADERS)
    return ParsedMail(
        message_id=message_id,
        subject=subject,
        headers={},
        text=None,
        html=None,
        parse_errors=[],
    )
