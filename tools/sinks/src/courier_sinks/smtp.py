"""The SMTP sink: a real SMTP server (aiosmtpd) that keeps every message it accepts.

It speaks the protocol for real — EHLO, SMTPUTF8, 8BITMIME, pipelining, dot-stuffing — so
Courier's mail sender is tested against the same dialogue a relay would give it, and the
failure switch makes that dialogue say no: the next N messages are answered, at the end of
DATA, with the reply code and text the test chose (451 to be retried, 550 to be dead-lettered).

Refused messages are not stored: they were not accepted. ``GET /_sink/fail`` shows how many
the switch has used.

Two options shape the sink for load tests: ``delay_ms`` makes it a slow relay (every message
is answered that long after its DATA ended, without holding up other sessions), and
``parse=False`` makes it a cheap one (lean records, see `SmtpMessage`), so that in a benchmark
the sink is not what limits the throughput.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Any, TypedDict

from aiosmtpd.smtp import SMTP, Envelope, Session
from starlette.applications import Starlette
from starlette.datastructures import QueryParams

from courier_sinks.base import SinkBase
from courier_sinks.control import ControlSpec, control_mount
from courier_sinks.failures import MAX_DELAY_MS, FailureSwitch, SmtpFailure, parse_smtp_failure
from courier_sinks.mail import parse_mail, parse_mail_headers
from courier_sinks.serving import UvicornService, bind, display_address
from courier_sinks.store import RecordStore, utc_now

__all__ = ["SmtpMessage", "SmtpSink", "check_delay_ms", "create_control_app"]

_log = logging.getLogger(__name__)

# What the server calls itself in its greeting. Given explicitly: aiosmtpd's default is
# socket.getfqdn(), a DNS lookup that can stall start-up for seconds on a machine without DNS.
SERVER_HOSTNAME = "courier-smtp-sink"


class SmtpMessage(TypedDict):
    """One accepted message, as stored (one JSON line) and as the control API lists it.

    ``headers`` has every header, lower-cased names, decoded; ``message_id`` keeps its angle
    brackets, as in the header. ``text``/``html`` are the decoded bodies, None when absent.
    ``received_at`` is when the sink accepted the message (after its ``delay_ms``, if any).

    A *lean* record (a sink with ``parse=False``) has ``received_at``, ``mail_from``,
    ``rcpt_tos``, ``raw_size``, and ``message_id`` and ``subject`` read from the header block
    (subject RFC 2047-decoded, as in a full record); ``headers`` is ``{}``, ``text`` and
    ``html`` are None and ``parse_errors`` is ``[]`` whatever the message holds.
    """

    received_at: str
    mail_from: str
    rcpt_tos: list[str]
    message_id: str | None
    subject: str | None
    headers: dict[str, str]
    text: str | None
    html: str | None
    raw_size: int
    parse_errors: list[str]


def check_delay_ms(delay_ms: int) -> int:
    """*delay_ms* if it is a whole number of milliseconds from 0 to `MAX_DELAY_MS`."""
    if isinstance(delay_ms, bool) or not isinstance(delay_ms, int):
        raise ValueError(f"delay_ms must be an integer, not {delay_ms!r}")
    if not 0 <= delay_ms <= MAX_DELAY_MS:
        raise ValueError(f"delay_ms must be from 0 to {MAX_DELAY_MS}, not {delay_ms}")
    return delay_ms


class _Handler:
    """aiosmtpd handler: at DATA, the delay, then the switch decides, else the message is stored.

    The delay comes first, so a slow relay is slow to refuse too. It is an `asyncio.sleep`:
    every session is a task on the sink's loop, and the others go on meanwhile.
    """

    def __init__(
        self,
        store: RecordStore[SmtpMessage],
        switch: FailureSwitch[SmtpFailure],
        *,
        delay_ms: int = 0,
        parse: bool = True,
    ) -> None:
        self._store = store
        self._switch = switch
        self._delay = delay_ms / 1000
        self._parse = parse_mail if parse else parse_mail_headers

    async def handle_DATA(self, _server: SMTP, _session: Session, envelope: Envelope) -> str:
        if self._delay:
            await asyncio.sleep(self._delay)
        failure = self._switch.take()
        if failure is not None:
            _log.info("smtp-sink: refused a message with %s", failure.reply())
            return failure.reply()
        raw = envelope.original_content or b""
        parsed = self._parse(raw)
        record = SmtpMessage(
            received_at=utc_now(),
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            message_id=parsed["message_id"],
            subject=parsed["subject"],
            headers=parsed["headers"],
            text=parsed["text"],
            html=parsed["html"],
            raw_size=len(raw),
            parse_errors=parsed["parse_errors"],
        )
        self._store.append(record)
        # Message-ID and counts only: recipients are email addresses, which stay out of logs.
        _log.info(
            "smtp-sink: accepted %s for %d recipient(s), %d bytes",
            record["message_id"],
            len(record["rcpt_tos"]),
            record["raw_size"],
        )
        return "250 2.0.0 OK: stored"


def _select_messages(messages: list[SmtpMessage], query: QueryParams) -> list[SmtpMessage]:
    """``?to=`` keeps messages with that envelope recipient (case-insensitive)."""
    to = query.get("to")
    if to is None:
        return messages
    wanted = to.strip().lower()
    return [m for m in messages if wanted in (r.lower() for r in m["rcpt_tos"])]


def create_control_app(
    store: RecordStore[SmtpMessage], switch: FailureSwitch[SmtpFailure]
) -> Starlette:
    """The SMTP sink's control API (``/_sink/messages``, ``/_sink/fail``, ``/_sink/healthz``)."""
    spec = ControlSpec(
        kind="smtp",
        records="messages",
        store=store,
        switch=switch,
        parse_failure=parse_smtp_failure,
        select=_select_messages,
    )
    return Starlette(routes=[control_mount(spec)])


class SmtpSink(SinkBase[SmtpMessage, SmtpFailure]):
    """An SMTP server in a background thread, plus its control API when *control_port* is set.

    Port 0 (the default) picks a free port; `port` and `control_url` tell which after `start`.
    *store_path* None keeps messages in memory only. *delay_ms* (0 to 600000) makes every
    message wait that long at the end of DATA before it is answered (other sessions are not
    held up). *parse* False keeps lean records (see `SmtpMessage`): no MIME parse, for load
    tests where the sink's CPU matters. A bad *delay_ms* raises `ValueError`.

    >>> with SmtpSink(store_path=tmp_path / "smtp.jsonl") as sink:  # doctest: +SKIP
    ...     send_welcome_mail(host=sink.host, port=sink.port)
    ...     [message] = sink.wait_for_messages(1)
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        store_path: Path | str | None = None,
        *,
        control_port: int | None = None,
        delay_ms: int = 0,
        parse: bool = True,
    ) -> None:
        self.delay_ms = check_delay_ms(delay_ms)  # before the store creates any file
        super().__init__("courier-smtp-sink", store_path)
        self.host = host
        self.parse = parse
        self._requested_port = port
        self._requested_control_port = control_port
        self._handler = _Handler(self.store, self.switch, delay_ms=self.delay_ms, parse=parse)
        self._server: asyncio.Server | None = None
        self._control: UvicornService | None = None

    def _bind(self) -> list[socket.socket]:
        sockets = [bind(self.host, self._requested_port)]
        if self._requested_control_port is not None:
            try:
                sockets.append(bind(self.host, self._requested_control_port))
            except BaseException:
                sockets[0].close()
                raise
        return sockets

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(
                self._handler,
                hostname=SERVER_HOSTNAME,
                enable_SMTPUTF8=True,
                loop=loop,
            ),
            sock=self._sockets[0],
        )
        if len(self._sockets) > 1:
            self._control = UvicornService(
                create_control_app(self.store, self.switch), self._sockets[1]
            )
            await self._control.start()

    async def _shutdown(self) -> None:
        if self._control is not None:
            await self._control.stop()
            self._control = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    @property
    def port(self) -> int:
        """The SMTP port actually listened on (the free one, if 0 was asked for)."""
        if not self._sockets:
            raise RuntimeError("the SMTP sink is not running")
        return display_address(self._sockets[0])[1]

    @property
    def control_url(self) -> str | None:
        """``http://host:port`` of the control API, or None when it was not asked for."""
        if len(self._sockets) < 2:
            return None
        host, port = display_address(self._sockets[1])
        return f"http://{host}:{port}"

    @property
    def messages(self) -> list[SmtpMessage]:
        """Every accepted message, oldest first (a copy)."""
        return self.store.all()

    def fail_next(self, count: int = 1, code: int = 451, message: str | None = None) -> None:
        """Answer the next *count* messages at end of DATA with *code* and *message*.

        Validated exactly like ``POST /_sink/fail``; raises `ValueError` on a bad value.
        """
        body: dict[str, Any] = {"count": count, "code": code}
        if message is not None:
            body["message"] = message
        self.switch.arm(*parse_smtp_failure(body))

    def wait_for_messages(
        self, count: int = 1, *, to: str | None = None, timeout: float = 10.0
    ) -> list[SmtpMessage]:
        """Block until *count* messages (for recipient *to*, if given) arrived; return them."""
        wanted = to.lower() if to is not None else None
        return self.store.wait_for(
            count,
            timeout=timeout,
            where=None
            if wanted is None
            else (lambda m: wanted in (r.lower() for r in m["rcpt_tos"])),
        )
