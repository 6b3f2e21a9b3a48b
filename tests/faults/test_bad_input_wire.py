"""B1: bad input on the wire, published straight to ``courier.events`` as any client could.

Each bad message must be dead-lettered on its first delivery (archived with attempts == 1 and
a reason an operator can act on), the notification worker must stay up (same process, ready)
with its memory bounded, and good registrations published in between must still be sent.

The broker takes a 10 MiB message without complaint (RabbitMQ 3.10: ``max_message_size``
134217728 (128 MiB), ``frame_max`` 131072, read back from a private node with ``rabbitmqctl
eval``). The worker refuses it unparsed (the envelope decoder's 1 MiB limit) and republishes
it whole to the dead-letter exchange; the archive keeps it whole (base64 in a Redis record,
about 14 MiB each).

Header values that are not UTF-8 are fine on a valid event (it is sent once) and on a message
that must be dead-lettered (the runner republishes them as byte arrays). A header *name* that
is not UTF-8 made the AMQP codec drop the connection and loop on the message; it is now read
with U+FFFD for the bad bytes (courier_common.messaging._pamqp_compat) and dead-lettered.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
from aio_pika.abc import AbstractExchange

from courier_testing.events import user_registered
from notification_service.routes import USER_EVENTS_QUEUE
from tests.support.archiver import ADMIN
from tests.support.faults import FaultStack, add_report_row
from tests.support.ledger import Contact, Ledger

pytestmark = pytest.mark.fault

MIB = 1024 * 1024
#: How much the worker's resident memory may grow over the whole test. Each 10 MiB body is
#: held a few times over while it is read, refused and republished to the dead-letter exchange;
#: none of it may stay.
RSS_GROWTH_BOUND = 64 * MIB
BIG_BODIES = 3


class RawStr(str):
    """A str whose "UTF-8 encoding" is the given bytes, invalid UTF-8 included.

    pamqp encodes every AMQP string with ``str.encode("utf-8")``, so this is how a test puts a
    non-UTF-8 string on the wire through aio-pika, as a publisher in another language can.
    """

    _raw: bytes

    def __new__(cls, raw: bytes) -> RawStr:
        self = super().__new__(cls, raw.decode("latin-1"))
        self._raw = raw
        return self

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self._raw


@dataclass(frozen=True)
class BadMessage:
    name: str
    message: aio_pika.Message
    reason: str  # a substring of the archived reason ("" when any reason will do)


def registered_event(contact: dict[str, Any] | None = None, **changes: Any) -> dict[str, Any]:
    """A ``user.registered`` envelope as JSON, for a contact nobody registered."""
    event = user_registered(
        f"wire-{secrets.token_hex(4)}@example.com", display_name="Wire", **(contact or {})
    )
    document: dict[str, Any] = json.loads(event.encode())
    for key, value in changes.items():
        if value is None:
            document.pop(key)
        else:
            document[key] = value
    return document


def message(
    name: str, body: bytes, content_type: str | None = "application/json", **kw: Any
) -> aio_pika.Message:
    return aio_pika.Message(
        body,
        content_type=content_type,
        message_id=f"b1-{name}-{secrets.token_hex(4)}",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        **kw,
    )


def junk_headers() -> dict[str, Any]:
    """Header values that are not UTF-8, in the headers Courier reads and in one it does not."""
    return {
        "traceparent": RawStr(b"00-\xff\xfe" + b"0" * 30 + b"-" + b"1" * 16 + b"-01"),
        "x-courier-attempt": RawStr(b"\xff\xfe"),
        "x-courier-original-routing-key": RawStr(b"user.\xc3\x28"),
        "x-vendor-note": RawStr(b"caf\xe9 \x80\x81"),
        "x-vendor-bytes": bytearray(b"\xff\x00\xfe"),
    }


def bad_messages() -> list[BadMessage]:
    def body(document: dict[str, Any]) -> bytes:
        return json.dumps(document).encode()

    big = b'{"pad": "' + b"x" * (10 * MIB) + b'"}'
    return [
        BadMessage("random-bytes", message("random-bytes", os.urandom(4096)), ""),
        BadMessage(
            "wrong-content-type",
            message("wrong-content-type", body(registered_event()), "text/plain"),
            "content type 'text/plain' is not application/json",
        ),
        BadMessage(
            "missing-id",
            message("missing-id", body(registered_event(id=None))),
            "missing required attribute 'id'",
        ),
        BadMessage(
            "unknown-type",
            message("unknown-type", body(registered_event(type="user.exploded"))),
            "unknown event type 'user.exploded'",
        ),
        BadMessage(
            "unknown-version",
            message("unknown-version", body(registered_event(version=99))),
            "unknown version 99 of 'user.registered'",
        ),
        *(
            BadMessage(
                f"10mib-{n}",
                message(f"10mib-{n}", big),
                # The list view masks digit runs that look like phone numbers: not the size.
                f"bytes exceeds the limit of {MIB} bytes",
            )
            for n in range(BIG_BODIES)
        ),
    ]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.fixture
async def events_exchange(fault_stack: FaultStack) -> AsyncIterator[AbstractExchange]:
    """``courier.events`` on the private broker, on a channel with publisher confirms."""
    connection = await aio_pika.connect(fault_stack.broker.url)
    channel = await connection.channel(publisher_confirms=True)
    yield await channel.get_exchange("courier.events")
    await connection.close()


def archived(archiver_url: str) -> dict[str, dict[str, Any]]:
    """Archive summaries by message id."""
    found: dict[str, dict[str, Any]] = {}
    cursor: str | None = None
    with httpx.Client(base_url=archiver_url, headers=ADMIN, timeout=60) as client:
        while True:
            params: dict[str, Any] = {"limit": 100, **({"cursor": cursor} if cursor else {})}
            page = client.get("/v1/dead-letters", params=params)
            page.raise_for_status()
            body = page.json()
            found.update({str(i["message_id"]): i for i in body["items"]})
            cursor = body.get("next_cursor")
            if not cursor:
                return found


async def wait_archived(
    fault_stack: FaultStack, items: list[BadMessage], *, timeout: float
) -> dict[str, dict[str, Any]]:
    """The archive record of each item (by message id); fails naming those never archived."""
    url = fault_stack.chain.url("dlq-archiver")
    wanted = {str(item.message.message_id) for item in items}
    deadline = time.monotonic() + timeout
    records = await asyncio.to_thread(archived, url)
    while not wanted <= records.keys() and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        records = await asyncio.to_thread(archived, url)
    missing = sorted(wanted - records.keys())
    assert not missing, f"not dead-lettered within {timeout:.0f}s: {missing}"
    return {message_id: records[message_id] for message_id in wanted}


def assert_dead_lettered_on_first_delivery(
    items: list[BadMessage], records: dict[str, dict[str, Any]]
) -> None:
    for item in items:
        record = records[str(item.message.message_id)]
        assert record["attempts"] == 1, (item.name, record)
        assert record["reason_class"] == "undecodable", (item.name, record)
        assert record["source_queue"] == USER_EVENTS_QUEUE, (item.name, record)
        assert record["reason"], item.name
        assert item.reason in record["reason"], (item.name, record["reason"])
        assert record["body_size"] == len(item.message.body), item.name


async def assert_worker_up(fault_stack: FaultStack, pid: int) -> None:
    worker = fault_stack.chain.processes["notification-service"]
    assert worker.proc is not None
    assert worker.proc.poll() is None, "the worker process died"
    assert worker.proc.pid == pid
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(f"{worker.url}/readyz")).status_code == 200


def worker_pid(fault_stack: FaultStack) -> int:
    proc = fault_stack.chain.processes["notification-service"].proc
    assert proc is not None
    return proc.pid


def accept_published(ledger: Ledger, document: dict[str, Any]) -> Contact:
    """Put a user whose event we publish ourselves into A: Courier owes its welcome too.

    The broker confirmed the event into ``courier.events``, which is what a 201 guarantees of
    a registration, so the ledger holds it to the same account.
    """
    data = document["data"]
    payload = {
        "email": data["email"],
        "channels": data["channels"],
        "phone": f"+1555{secrets.randbelow(10**7):07d}",
        "push_token": f"unused-{secrets.token_hex(4)}",
    }
    contact = ledger.record(payload, httpx.Response(201, json={"id": data["user_id"]}))
    assert contact is not None
    return contact


def emails_to(fault_stack: FaultStack, address: str) -> int:
    return sum(rcpt.lower() == address for m in fault_stack.smtp.messages for rcpt in m["rcpt_tos"])


async def test_bad_messages_are_dead_lettered_on_first_delivery(
    fault_stack: FaultStack, events_exchange: AbstractExchange
) -> None:
    ledger = fault_stack.ledger("B1 good registrations among bad messages")
    pid = worker_pid(fault_stack)
    for _ in range(3):  # warm up: the worker has handled real traffic before we measure it
        await asyncio.to_thread(ledger.register, fault_stack.users)
    await asyncio.to_thread(
        ledger.settle,
        smtp=fault_stack.smtp,
        http=fault_stack.http,
        archiver_url=fault_stack.chain.url("dlq-archiver"),
    )
    rss_before = rss_bytes(pid)

    bad = bad_messages()
    for item in bad:
        await events_exchange.publish(item.message, routing_key="user.registered")  # confirmed
        assert await asyncio.to_thread(ledger.register, fault_stack.users) is not None
    # A valid event whose header values (trace context, attempt, a vendor's) are not UTF-8:
    # the headers are junk, the event is not, so it is handled like any other.
    junk_event = registered_event()
    junk_contact = accept_published(ledger, junk_event)
    await events_exchange.publish(
        message("valid-junk-headers", json.dumps(junk_event).encode(), headers=junk_headers()),
        routing_key="user.registered",
    )

    records = await wait_archived(fault_stack, bad, timeout=120)
    assert_dead_lettered_on_first_delivery(bad, records)
    await assert_worker_up(fault_stack, pid)
    growth = rss_bytes(pid) - rss_before
    assert growth < RSS_GROWTH_BOUND, f"worker RSS grew by {growth / MIB:.1f} MiB"

    await asyncio.to_thread(fault_stack.check, ledger)
    assert emails_to(fault_stack, junk_contact.email) == 1, "the event with junk headers"
    add_report_row(
        scenario="B1 bad messages on the wire (published, archived at attempt 1)",
        accepted=len(bad),
        dead_lettered=len(records),
        lost=len(bad) - len(records),
        unexpected=0,
    )


@pytest.mark.parametrize(
    ("name", "scenario"),
    [
        ("non-utf8-header-values", "B1 good registrations among non-UTF-8 header values"),
        ("non-utf8-header-name", "B1 good registrations after a non-UTF-8 header name"),
    ],
    ids=["header-values", "header-name"],
)
async def test_non_utf8_headers_are_dead_lettered_and_the_worker_goes_on(
    fault_stack: FaultStack, events_exchange: AbstractExchange, name: str, scenario: str
) -> None:
    """Non-UTF-8 header values (the decoder hands back bytes the encoder refused) or a header
    name (pamqp could not decode the frame): dead-lettered once, and the worker goes on."""
    ledger = fault_stack.ledger(scenario)
    pid = worker_pid(fault_stack)
    body = json.dumps(registered_event(type="user.exploded")).encode()
    headers = (
        junk_headers() if name == "non-utf8-header-values" else {RawStr(b"x-\xff\xfe"): "value"}
    )
    bad = [
        BadMessage(name, message(name, body, headers=headers), "unknown event type 'user.exploded'")
    ]
    await events_exchange.publish(bad[0].message, routing_key="user.registered")
    assert await asyncio.to_thread(ledger.register, fault_stack.users) is not None

    records = await wait_archived(fault_stack, bad, timeout=45)
    assert_dead_lettered_on_first_delivery(bad, records)
    await assert_worker_up(fault_stack, pid)
    await asyncio.to_thread(fault_stack.check, ledger)
