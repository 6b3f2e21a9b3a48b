"""Masking email addresses and phone numbers: the one PII policy for text leaving a process.

Log lines (`courier_common.logging.scrub_pii`), span exception events
(`courier_common.tracing.record_failure`), error bodies, dead-letter diagnoses and archived
records all go through `scrub_text`, so "no email or phone number in clear" is decided here and
nowhere else.

Masking is regex based and deliberately errs towards masking: a stray long number in free text
may come out masked, an email or phone number must never come out in clear. Numbers that are
data (durations, counts, sizes) should be logged as ``int``/``float`` values, which
`scrub_value` never touches.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import enum
import re
import uuid
from typing import Final

__all__ = ["mask_email", "mask_phone", "scrub_text", "scrub_value"]


# An email address: the local part must start at a boundary so the mask keeps a real first
# character; the domain needs a dot and an alphabetic TLD so "user@host" in an AMQP URL without
# a TLD is left alone (it carries no address anyone could mail).
_EMAIL_RE: Final = re.compile(
    r"(?<![\w.%+-])[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}(?![\w-])",
)

# A phone number candidate: an optional "+" or "(", then digits with the separators people write
# phone numbers with. The look-arounds keep digit runs that are part of something bigger — a hex
# trace id, a UUID segment, an IP address, a time, a decimal — from being taken for a phone. The
# final say (digit count, dates, decimals, IPv4) is in `_mask_phone_match`.
_PHONE_RE: Final = re.compile(
    r"(?<![\w+\-@])(?<!\d[.:,])[+(]?\d[\d ().\-]{6,}\d(?![\w\-@])(?![.:,]\d)",
)

# E.164 allows at most 15 digits; fewer than 8 is a count or a code, not a phone number.
_PHONE_MIN_DIGITS: Final = 8
_PHONE_MAX_DIGITS: Final = 15
_NON_DIGIT_RE: Final = re.compile(r"\D")
# Shapes that have phone-like digit counts but are not phone numbers.
_NOT_A_PHONE_RE: Final = re.compile(
    r"\d{4}-\d{2}-\d{2}"  # ISO date: 2024-05-01
    r"|\d+\.\d+"  # a decimal number: 0.12345678
    r"|\d{1,3}(?:\.\d{1,3}){3}",  # an IPv4 address: 192.168.100.200
)

# The shortest string either pattern can match ("a@b.cc"); shorter strings skip both regexes.
_MIN_PII_LENGTH: Final = 6
# Containers nested deeper than this are rendered to text and scrubbed as text, which also keeps
# a self-referencing structure from recursing forever.
_MAX_DEPTH: Final = 8
# Types whose rendered form cannot carry an email or phone number: skipped without rendering.
_SAFE_TYPES: Final = (
    int,
    float,
    type(None),
    uuid.UUID,
    _dt.date,
    _dt.time,
    _dt.timedelta,
    decimal.Decimal,
    enum.Enum,
)


def mask_email(value: str) -> str:
    """Mask an email address while keeping it recognisable to whoever owns it.

    Support staff need to tell "the gmail user starting with a" from "the corporate one" without
    the log holding an address anyone could write to, so only the first character of the local
    part and of the domain survive, plus the TLD: ``alice.smith@example.com`` → ``a***@e***.com``.
    Anything without an ``@`` is masked completely rather than guessed at.
    """
    local, at, domain = value.strip().rpartition("@")
    if not at or not local or not domain:
        return "***"
    host, dot, tld = domain.rpartition(".")
    if not dot:
        host, tld = domain, ""
    masked_domain = f"{host[:1]}***" + (f".{tld}" if tld else "")
    return f"{local[:1]}***@{masked_domain}"


def mask_phone(value: str) -> str:
    """Mask a phone number down to what helps a human match it, and no more.

    The leading "+" and the first digit (never more than the country code) say which country, the
    last three digits let support match it against what a user reads out, and one ``*`` per hidden
    digit keeps the length visible: ``+14155552671`` → ``+1*******671``. Formatting is dropped,
    so ``+1 (415) 555-2671`` masks the same way. Too short to mask partially → all stars.
    """
    international = value.lstrip().startswith("+")
    digits = _NON_DIGIT_RE.sub("", value)
    if len(digits) < _PHONE_MIN_DIGITS:
        return ("+" if international else "") + "*" * len(digits)
    head = digits[0] if international else ""
    hidden = len(digits) - len(head) - 3
    return ("+" if international else "") + head + "*" * hidden + digits[-3:]


def _mask_email_match(match: re.Match[str]) -> str:
    return mask_email(match.group())


def _mask_phone_match(match: re.Match[str]) -> str:
    candidate = match.group()
    digit_count = len(_NON_DIGIT_RE.sub("", candidate))
    if not _PHONE_MIN_DIGITS <= digit_count <= _PHONE_MAX_DIGITS:
        return candidate
    if _NOT_A_PHONE_RE.fullmatch(candidate):
        return candidate
    return mask_phone(candidate)


def scrub_text(text: str) -> str:
    """Mask every email address and phone number found in free text.

    This is the one PII policy for anything that leaves the process as text: log lines, span
    exception events, dead-letter diagnosis headers. Returns *text* itself (same object) when
    nothing was found, so callers can detect "unchanged" with ``is`` for free.
    """
    if len(text) < _MIN_PII_LENGTH:
        return text
    scrubbed = _EMAIL_RE.sub(_mask_email_match, text) if "@" in text else text
    scrubbed = _PHONE_RE.sub(_mask_phone_match, scrubbed)
    # A candidate the callback declined (a date, say) still makes re.sub build a new string.
    return text if scrubbed is text or scrubbed == text else scrubbed


def scrub_value(value: object) -> object:
    """Mask emails and phone numbers anywhere in *value*; *value* itself if there is none.

    Strings are scrubbed as text; dicts, lists and tuples item by item, copied when something
    inside changed (never modified in place: they belong to the caller, a payload or a headers
    dict), so the common case — nothing to mask — allocates nothing. Types whose text cannot
    hold either (numbers, UUIDs, dates) pass untouched; anything else is scrubbed as its
    ``repr()``, the text a log renderer would print.
    """
    return _scrub_value(value, 0)


def _scrub_value(value: object, depth: int) -> object:
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, _SAFE_TYPES):
        return value
    if depth < _MAX_DEPTH:
        if isinstance(value, dict):
            scrubbed_items = {key: _scrub_value(item, depth + 1) for key, item in value.items()}
            if any(scrubbed_items[key] is not item for key, item in value.items()):
                return scrubbed_items
            return value
        if isinstance(value, list | tuple):
            scrubbed_seq = [_scrub_value(item, depth + 1) for item in value]
            if any(new is not old for new, old in zip(scrubbed_seq, value, strict=True)):
                return scrubbed_seq if isinstance(value, list) else tuple(scrubbed_seq)
            return value
    # Anything else (exceptions, models, bytes, deep structures) ends up as repr() in the rendered
    # line anyway; scrub that text, and keep the original object if there was nothing to mask so
    # the renderer formats it as usual.
    rendered = repr(value)
    scrubbed = scrub_text(rendered)
    return value if scrubbed is rendered else scrubbed
