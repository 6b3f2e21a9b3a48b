"""pamqp reads a header name that is not UTF-8 (with U+FFFD), instead of failing the frame."""

from __future__ import annotations

from pamqp import decode, encode

import courier_common.messaging  # noqa: F401  # installs the tolerant decoder


def raw_table(entries: list[tuple[bytes, bytes]]) -> bytes:
    """A field table on the wire: short-string keys, long-string ('S') values."""
    body = b"".join(
        bytes([len(key)]) + key + b"S" + len(value).to_bytes(4, "big") + value
        for key, value in entries
    )
    return len(body).to_bytes(4, "big") + body


def test_a_key_that_is_not_utf8_decodes_with_replacement_characters() -> None:
    wire = raw_table([(b"x-\xff\xfe", b"value"), (b"x-good", b"\xc3\xa9t\xc3\xa9")])
    consumed, table = decode.by_type(wire, "table")
    assert consumed == len(wire)
    assert table == {"x-\ufffd\ufffd": "value", "x-good": "été"}
    # and what was read can be written back (a dead-letter republish)
    assert encode.by_type(table, "table")


def test_nested_tables_are_tolerant_too() -> None:
    inner = raw_table([(b"\xff", b"v")])
    outer_body = bytes([5]) + b"inner" + b"F" + inner
    wire = len(outer_body).to_bytes(4, "big") + outer_body
    _, table = decode.by_type(wire, "table")
    assert table == {"inner": {"\ufffd": "v"}}
