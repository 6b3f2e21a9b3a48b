"""Let pamqp (the AMQP codec under aio-pika) read a header *name* that is not UTF-8.

pamqp 4 decodes a field-table key with a strict ``.decode("utf-8")``. A message from some other
publisher with such a header name then fails to unmarshal: aiormq drops the connection, the
broker redelivers the same message to the reconnected consumer, and the worker loops on it
(found by the fault suite, B1). Long-string *values* already fall back to ``bytes``; this does
the same job for keys by decoding them with U+FFFD for the bad bytes, so the message reaches the
consumer runner, which dead-letters it with a reason like any other bad message.

`install` swaps pamqp's field-table decoder in the two dispatch tables that hold it. It is
applied when ``courier_common.messaging`` is imported, and is idempotent.

It also gives ``Connection.Close`` a ``repr`` with the broker's reply. aiormq reports a broker
that closes the connection in answer to ``Connection.Open`` (an unknown vhost, a user without
access to it) as ``InvalidFrameError("Expected ... OpenOk, got <repr of the frame>")``, and
pamqp's default repr (``<Connection.Close object at 0x...>``) dropped the one thing an
operator needs: ``NOT_ALLOWED - vhost 'x' not found``.
"""

from __future__ import annotations

import struct
from typing import Final

from pamqp import commands, common
from pamqp import decode as _decode

_ORIGINAL: Final = _decode.field_table


def field_table(value: bytes) -> tuple[int, common.FieldTable]:
    """pamqp's ``decode.field_table``, tolerant of keys that are not UTF-8."""
    try:
        length = common.Struct.integer.unpack(value[0:4])[0]
        offset = 4
        data: common.FieldTable = {}
        end = offset + length
        if end > len(value):
            raise ValueError("Field table length exceeds available data")
        while offset < end:
            key_length = common.Struct.byte.unpack_from(value, offset)[0]
            offset += 1
            if offset + key_length > end:
                raise ValueError("Field table key length exceeds data")
            key = value[offset : offset + key_length].decode("utf-8", errors="replace")
            offset += key_length
            consumed, result = _decode.embedded_value(value[offset:])
            offset += consumed
            data[key] = result
        return end, data
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack data") from err


def _close_repr(frame: commands.Connection.Close) -> str:
    return f"<Connection.Close reply_code={frame.reply_code} reply_text={frame.reply_text!r}>"


def install() -> None:
    """Use the tolerant decoder everywhere pamqp looks a field table up; readable closes."""
    _decode.field_table = field_table
    _decode.METHODS["table"] = field_table
    _decode.TABLE_MAPPING[b"F"] = field_table
    commands.Connection.Close.__repr__ = _close_repr  # type: ignore[method-assign,assignment]


install()
