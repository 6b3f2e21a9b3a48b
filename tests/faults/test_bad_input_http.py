"""B2: bad input over HTTP, sent to user-service and the dlq-archiver running as processes.

Each bad request gets a 4xx (never a 5xx), and an error body never echoes what was sent: each
payload carries a distinctive marker, and the marker must not come back. The HTTP parser is
part of what is tested (uvicorn with httptools, as deployed), so requests httpx refuses to
build (control characters in header values) go over a raw socket.

Where the standards make a request valid, it is accepted, and that is asserted too:

* A malformed ``traceparent`` is not the client's error: W3C Trace Context (§4.3) says a
  receiver that cannot parse it ignores it (and ``tracestate`` with it) and starts a new trace.
  So the registration is answered 201.
* A CRLF inside a header value ends the field: the rest is a new header line, and a request
  that is well-formed after that split is valid (what matters is that an injected field cannot
  smuggle a second body length, which is a 400). A bare LF as a line end is allowed by RFC 9112
  §2.2 ("MAY recognize a single LF"), and obs-fold (§5.2) may be rejected or replaced by a
  space, so both outcomes are acceptable there; a bare CR or a NUL in a value (RFC 9110 §5.5)
  must be refused.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support.archiver import ADMIN
from tests.support.chain import Chain
from tests.support.faults import add_report_row
from tests.support.helpers import user_payload

pytestmark = pytest.mark.fault

MIB = 1024 * 1024
MARKER = "b2zq"  # in every payload; it appears nowhere in Courier's own messages


@dataclass(frozen=True)
class Case:
    """One bad request through httpx, and the status it must get."""

    name: str
    service: str
    method: str
    path: str
    expect: int
    content: bytes | None = None
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    stream: bool = False  # send the body chunked, with no Content-Length


def nested(levels: int) -> bytes:
    """``{"email": {"a": {"a": ... "b2zq" ...}}}`` nested *levels* deep."""
    return b'{"email":' + b'{"a":' * levels + f'"{MARKER}"'.encode() + b"}" * (levels + 1)


def long_email() -> str:
    return (MARKER * 2500)[:9988] + "@example.com"  # 10,000 characters


def cases() -> list[Case]:
    user = user_payload()
    big = json.dumps({**user, "display_name": MARKER * (MIB // len(MARKER))}).encode()
    replay = "/v1/dead-letters/replay"
    return [
        Case("1 MiB body, declared", "user-service", "POST", "/v1/users", 413, big),
        Case("1 MiB body, chunked", "user-service", "POST", "/v1/users", 413, big, stream=True),
        Case(
            "10,000-character email",
            "user-service",
            "POST",
            "/v1/users",
            422,
            json.dumps({**user, "email": long_email()}).encode(),
        ),
        Case(
            "10,000-character email in the query",
            "user-service",
            "GET",
            "/v1/users",
            422,
            params={"email": long_email()},
        ),
        Case("JSON nested 10,000 deep", "user-service", "POST", "/v1/users", 400, nested(10_000)),
        Case(
            "JSON arrays nested 10,000 deep",
            "user-service",
            "POST",
            "/v1/users",
            400,
            b"[" * 10_000 + f'"{MARKER}"'.encode() + b"]" * 10_000,
        ),
        Case(
            "Idempotency-Key of 10,000 characters",
            "user-service",
            "POST",
            "/v1/users",
            422,
            json.dumps(user_payload(email="idem@example.com")).encode(),
            headers={"Idempotency-Key": MARKER * 2500},
        ),
        Case("1 MiB body, declared", "dlq-archiver", "POST", replay, 413, big),
        Case("JSON nested 10,000 deep", "dlq-archiver", "POST", replay, 400, nested(10_000)),
        Case(
            "10,000-character filter",
            "dlq-archiver",
            "POST",
            replay,
            422,
            json.dumps({"queue": MARKER * 2500}).encode(),
        ),
        Case(
            "10,000-character query",
            "dlq-archiver",
            "GET",
            "/v1/dead-letters",
            422,
            params={"event_type": MARKER * 2500},
        ),
    ]


def send(chain: Chain, case: Case) -> httpx.Response:
    admin = ADMIN if case.service == "dlq-archiver" else {}
    headers = {"content-type": "application/json", **admin, **case.headers}
    content: Any = case.content
    if case.stream and case.content is not None:
        body = case.content

        def chunks() -> Iterator[bytes]:
            for start in range(0, len(body), 64 * 1024):
                yield body[start : start + 64 * 1024]

        content = chunks()
    with httpx.Client(base_url=chain.url(case.service), timeout=60) as client:
        try:
            return client.request(
                case.method, case.path, content=content, params=case.params, headers=headers
            )
        except httpx.RemoteProtocolError:
            # The server answered 413 and closed before the whole upload was sent; ask again
            # with a body small enough to be read, to see the answer it gives (still a 413).
            if not case.stream:
                raise
            return client.request(
                case.method,
                case.path,
                content=iter([body[: 128 * 1024]]),
                headers=headers,
            )


@dataclass(frozen=True)
class RawAnswer:
    status: int
    text: str


def raw_request(url: str, head: bytes, body: bytes = b"") -> RawAnswer:
    """Send bytes as they are (httpx refuses control characters); read until the server closes."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head + body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    status_line = received.split(b"\r\n", 1)[0].decode("latin-1")
    assert status_line.startswith("HTTP/1.1 "), f"no HTTP answer: {received[:200]!r}"
    return RawAnswer(int(status_line.split()[1]), received.decode("latin-1"))


def raw_head(service: str, url: str, extra: bytes, body: bytes) -> bytes:
    """A registration (user-service) or an archive listing (dlq-archiver), plus *extra* lines."""
    line = b"POST /v1/users" if service == "user-service" else b"GET /v1/dead-letters"
    auth = (
        b""
        if service == "user-service"
        else f"Authorization: {ADMIN['Authorization']}\r\n".encode()
    )
    return (
        line + b" HTTP/1.1\r\nHost: " + urlsplit(url).netloc.encode() + b"\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        + auth
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n"
        + extra
        + b"\r\n"
    )


#: (name, header line(s) to add, what the standards allow: "refuse" or "either")
RAW_CASES: list[tuple[str, bytes, str]] = [
    ("bare CR in a value", b"X-Note: " + MARKER.encode() + b"\rInjected: 1\r\n", "refuse"),
    ("NUL in a value", b"X-Note: " + MARKER.encode() + b"\x00tail\r\n", "refuse"),
    (
        "CRLF smuggling a second Content-Length",
        b"X-Note: " + MARKER.encode() + b"\r\nContent-Length: 2\r\n",
        "refuse",
    ),
    (
        "CRLF smuggling Transfer-Encoding",
        b"X-Note: " + MARKER.encode() + b"\r\nTransfer-Encoding: chunked\r\n",
        "refuse",
    ),
    ("bare LF in a value", b"X-Note: " + MARKER.encode() + b"\nInjected: 1\r\n", "either"),
    ("obs-fold", b"X-Note: " + MARKER.encode() + b"\r\n folded\r\n", "either"),
    (
        "CRLF in Idempotency-Key (a new header line)",
        b"Idempotency-Key: " + MARKER.encode() + b"\r\nX-Injected: 1\r\n",
        "either",
    ),
]


def test_bad_http_input_is_refused_unechoed_and_malformed_trace_context_ignored(
    chain: Chain, subtests: Any
) -> None:
    """One stack for both halves (starting the services is most of the cost)."""
    bad_requests_get_a_4xx_that_never_echoes_them(chain, subtests)
    a_malformed_traceparent_is_ignored_and_the_request_served(chain, subtests)


def _stored(client: httpx.Client, email: str) -> bool:
    """Whether user-service holds a user with *email* (the ledger's source of truth)."""
    found = client.get("/v1/users", params={"email": email})
    assert found.status_code == 200, found.text
    return bool(found.json()["items"])


def bad_requests_get_a_4xx_that_never_echoes_them(chain: Chain, subtests: Any) -> None:
    refused = accepted = 0
    answered: dict[str, bool] = {}  # email registered through a raw request -> answered 2xx
    for case in cases():
        with subtests.test(msg=f"{case.service}: {case.name}"):
            response = send(chain, case)
            assert response.status_code == case.expect, (response.status_code, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["status"] == case.expect
            assert MARKER not in response.text
            assert all(MARKER not in value for value in response.headers.values())
            refused += 1

    for service in ("user-service", "dlq-archiver"):
        url = chain.url(service)
        for n, (name, extra, allowed) in enumerate(RAW_CASES):
            with subtests.test(msg=f"{service}, raw: {name}"):
                email = f"raw-{n}-{time.monotonic_ns()}@example.com"
                body = json.dumps(user_payload(email=email)).encode()
                if service == "dlq-archiver":
                    body = b""
                answer = raw_request(url, raw_head(service, url, extra, body), body)
                assert answer.status < 500, answer.text[:300]
                if allowed == "refuse":
                    assert 400 <= answer.status < 500, answer.text[:300]
                else:
                    assert answer.status in (200, 201, 400), answer.text[:300]
                assert MARKER not in answer.text
                refused += answer.status >= 400
                accepted += answer.status < 400
                if service == "user-service":
                    answered[email] = answer.status < 400

    # Still serving; every accepted registration is stored, every refused one left nothing.
    with httpx.Client(base_url=chain.url("user-service"), timeout=30) as client:
        created = client.post("/v1/users", json=user_payload(email="after@example.com"))
        assert created.status_code == 201, created.text
        refused_emails = [email for email, ok in answered.items() if not ok]
        refused_emails += [user_payload()["email"], "idem@example.com"]  # the bodies of cases()
        lost = sum(not _stored(client, email) for email, ok in answered.items() if ok)
        unexpected = sum(_stored(client, email) for email in refused_emails)
    add_report_row(
        scenario="B2 bad input over HTTP (4xx, never echoed)",
        accepted=accepted,
        refused=refused,
        lost=lost,
        unexpected=unexpected,
    )
    assert (lost, unexpected) == (0, 0)


#: Malformed per W3C Trace Context §3.2: each must be ignored, never refused.
MALFORMED_TRACEPARENTS = {
    "garbage": MARKER,
    "all-zero trace id": f"00-{'0' * 32}-{'1' * 16}-01",
    "all-zero parent id": f"00-{'a' * 32}-{'0' * 16}-01",
    "version ff": f"ff-{'a' * 32}-{'b' * 16}-01",
    "uppercase hex": f"00-{'A' * 32}-{'b' * 16}-01",
    "not hex": f"00-{MARKER * 8}-{'b' * 16}-01",
    "10,000 characters": "00-" + MARKER * 2500,
}


def a_malformed_traceparent_is_ignored_and_the_request_served(chain: Chain, subtests: Any) -> None:
    accepted: list[str] = []
    with httpx.Client(base_url=chain.url("user-service"), timeout=30) as client:
        for name, traceparent in MALFORMED_TRACEPARENTS.items():
            with subtests.test(msg=name):
                email = f"trace-{time.monotonic_ns()}@example.com"
                response = client.post(
                    "/v1/users",
                    json=user_payload(email=email),
                    headers={"traceparent": traceparent, "tracestate": f"courier={MARKER}"},
                )
                assert response.status_code == 201, response.text
                assert MARKER not in response.text
                assert all(MARKER not in value for value in response.headers.values())
                accepted.append(email)
        lost = sum(not _stored(client, email) for email in accepted)
    add_report_row(
        scenario="B2 malformed traceparent (ignored per W3C, 201)",
        accepted=len(accepted),
        refused=len(MALFORMED_TRACEPARENTS) - len(accepted),
        lost=lost,
        unexpected=0,  # every request here was meant to be accepted
    )
    assert lost == 0
