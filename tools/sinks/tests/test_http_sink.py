"""The HTTP sink, driven by a real HTTP client over a real socket."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx
import pytest

from courier_sinks import HttpSink, SinkControl, mask_credentials

SMS = {"to": "+14155552671", "body": "Welcome to Courier, Ada!"}


def _sms(client: httpx.Client, key: str | None = None, path: str = "/sms") -> httpx.Response:
    headers = {"Authorization": "Bearer sk_test_0123456789abcd"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post(path, json=SMS, headers=headers)


def test_request_is_recorded_and_accepted(http_sink: HttpSink, client: httpx.Client) -> None:
    key = str(uuid.uuid4())
    response = client.post(
        "/sms?channel=sms",
        json=SMS,
        headers={"Idempotency-Key": key, "Authorization": "Bearer sk_test_0123456789abcd"},
    )

    assert response.status_code == 202
    answer = response.json()
    assert answer["status"] == "accepted"
    assert uuid.UUID(answer["id"])

    [recorded] = http_sink.requests
    assert recorded["method"] == "POST"
    assert recorded["path"] == "/sms"
    assert recorded["query"] == "channel=sms"
    assert recorded["body"] == SMS
    assert recorded["body_is_json"] is True
    assert recorded["status"] == 202
    assert recorded["id"] == answer["id"]
    assert recorded["replay"] is False
    assert recorded["headers"]["idempotency-key"] == key
    assert recorded["headers"]["content-type"] == "application/json"
    assert recorded["headers"]["authorization"] == "Bearer ****abcd"
    assert recorded["received_at"].endswith("Z")

    assert http_sink.store_path is not None
    stored = http_sink.store_path.read_text(encoding="utf-8")
    assert "sk_test_0123456789abcd" not in stored
    assert [json.loads(line) for line in stored.splitlines()] == [recorded]


def test_any_path_and_a_non_json_body(http_sink: HttpSink, client: httpx.Client) -> None:
    assert client.post("/push", json={"token": "t", "title": "标题"}).status_code == 202
    response = client.post(
        "/v2/messages", content="To=%2B1415&Body=hi", headers={"content-type": "text/plain"}
    )
    assert response.status_code == 202

    push, other = http_sink.requests
    assert push["path"] == "/push"
    assert push["body"] == {"token": "t", "title": "标题"}
    assert other["path"] == "/v2/messages"
    assert other["body"] == "To=%2B1415&Body=hi"
    assert other["body_is_json"] is False


def test_same_idempotency_key_is_replayed_and_flagged(
    http_sink: HttpSink, client: httpx.Client
) -> None:
    key = "evt-0192f5a1:sms"
    first = _sms(client, key)
    second = _sms(client, key)

    assert second.status_code == 202
    assert second.json() == first.json()
    assert second.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert [r["replay"] for r in http_sink.requests] == [False, True]
    assert [r["id"] for r in http_sink.requests] == [first.json()["id"]] * 2
    assert len(http_sink.deliveries) == 1

    # Keys are per provider (path), and requests without a key are never replays.
    assert _sms(client, key, path="/push").json() != first.json()
    assert _sms(client).json() != _sms(client).json()
    assert len(http_sink.deliveries) == 4

    # A cleared sink is a provider with no history: the key is new again.
    http_sink.clear()
    assert _sms(client, key).json() != first.json()
    assert http_sink.requests[0]["replay"] is False


def test_503_twice_then_accepted(
    http_sink: HttpSink, http_control: SinkControl, client: httpx.Client
) -> None:
    http_control.fail_next(2, status=503)
    key = "evt-1:sms"

    answers = [_sms(client, key) for _ in range(3)]

    assert [a.status_code for a in answers] == [503, 503, 202]
    assert answers[0].json() == {
        "error": "Service Unavailable",
        "status": 503,
        "message": "failure injected by courier-http-sink",
    }
    # Failed attempts are recorded with their answer; the key was only claimed by the 202.
    assert [(r["status"], r["replay"], r["id"]) for r in http_control.requests()] == [
        (503, False, None),
        (503, False, None),
        (202, False, answers[2].json()["id"]),
    ]
    assert http_control.failure() == {"armed": False, "remaining": 0, "used": 2}


def test_429_carries_retry_after(http_sink: HttpSink, client: httpx.Client) -> None:
    http_sink.fail_next(1, 429, retry_after=7, message="slow down")
    response = _sms(client)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.json()["message"] == "slow down"
    assert _sms(client).status_code == 202


def test_400_is_answered_too(http_sink: HttpSink, client: httpx.Client) -> None:
    http_sink.fail_next(1, 400)
    response = _sms(client)
    assert response.status_code == 400
    assert "retry-after" not in response.headers
    assert http_sink.requests[0]["status"] == 400


def test_failures_scoped_to_one_path(
    http_sink: HttpSink, http_control: SinkControl, client: httpx.Client
) -> None:
    http_control.fail_next(1, status=503, path="/sms")

    assert client.post("/push", json={}).status_code == 202  # does not use the failure up
    assert http_control.failure()["remaining"] == 1
    assert _sms(client).status_code == 503
    assert _sms(client).status_code == 202
    assert [(r["path"], r["status"]) for r in http_control.requests()] == [
        ("/push", 202),
        ("/sms", 503),
        ("/sms", 202),
    ]
    assert [r["status"] for r in http_control.requests(path="/sms")] == [503, 202]


def test_bearer_token_is_required_when_set(tmp_path: Path) -> None:
    with (
        HttpSink(store_path=tmp_path / "http.jsonl", token="sk_test_0123456789abcd") as sink,
        httpx.Client(base_url=sink.url) as client,
    ):
        sink.fail_next(1, 503)

        missing = client.post("/sms", json=SMS)
        wrong = client.post("/sms", json=SMS, headers={"Authorization": "Bearer nope-nope-nope"})
        assert missing.status_code == wrong.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert sink.failure["remaining"] == 1  # a bad token is not an outage

        assert _sms(client).status_code == 503
        assert _sms(client).status_code == 202
        assert [r["status"] for r in sink.requests] == [401, 401, 503, 202]
        assert sink.requests[1]["headers"]["authorization"] == "Bearer ****nope"
        # The control API itself needs no token: it is the test's, not the provider's.
        assert httpx.get(f"{sink.url}/_sink/healthz").status_code == 200


def test_delay_makes_a_client_time_out_then_answers_normally(
    http_sink: HttpSink, client: httpx.Client
) -> None:
    http_sink.delay_next(1, 1500)
    assert http_sink.failure["status"] is None

    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        client.post("/sms", json=SMS, timeout=0.3)
    assert time.monotonic() - started < 1.0

    started = time.monotonic()
    assert client.post("/sms", json=SMS).status_code == 202
    assert time.monotonic() - started < 1.0

    # The timed-out request still arrives, late and accepted: a provider that was slow,
    # not down. That is the duplicate-delivery window an Idempotency-Key exists for.
    late = http_sink.wait_for_requests(2, timeout=5)
    assert [r["status"] for r in late] == [202, 202]


def test_delay_with_an_error(http_sink: HttpSink, client: httpx.Client) -> None:
    http_sink.fail_next(1, 504, delay_ms=200)
    started = time.monotonic()
    assert client.post("/sms", json=SMS).status_code == 504
    assert time.monotonic() - started >= 0.2


def test_control_routes_are_not_provider_routes(http_sink: HttpSink, client: httpx.Client) -> None:
    assert client.post("/_sink/requests", json={}).status_code == 405
    assert client.post("/_sink/nowhere", json={}).status_code == 404
    assert client.get("/sms").status_code == 405
    assert http_sink.requests == []
    assert client.get("/_sink/healthz").json() == {
        "status": "ok",
        "kind": "http",
        "records": "requests",
        "count": 0,
    }


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"count": 1, "status": 202}, "status must be an integer from 400 to 599"),
        ({"count": 1, "status": None}, "only makes sense with a delay_ms"),
        ({"count": 1, "code": 451}, "unknown field(s) ['code']"),
        ({"count": 1, "retry_after": -1}, "retry_after"),
        ({"count": 1, "delay_ms": "100"}, "delay_ms"),
        ({"count": True}, "count"),
    ],
)
def test_invalid_failure_specs_are_refused(
    http_sink: HttpSink, client: httpx.Client, body: dict[str, object], reason: str
) -> None:
    response = client.post("/_sink/fail", json=body)
    assert response.status_code == 422
    assert reason in response.json()["message"]
    assert http_sink.failure["armed"] is False


def test_fail_body_must_be_a_json_object(client: httpx.Client) -> None:
    assert client.post("/_sink/fail", content="{not json").status_code == 400
    assert client.post("/_sink/fail", json=[1]).status_code == 422


def test_path_filter_accepts_a_path_without_slash(
    http_control: SinkControl, client: httpx.Client
) -> None:
    client.post("/push", json={})
    client.post("/sms", json={})
    assert [r["path"] for r in http_control.requests(path="push")] == ["/push"]


@pytest.mark.parametrize(
    ("value", "masked"),
    [
        ("Bearer sk_live_abcdefgh1234", "Bearer ****1234"),
        ("Basic dXNlcjpwYXNzd29yZA==", "Basic ****ZA=="),
        ("Bearer short", "Bearer ****"),
        ("raw-api-key-123456", "****3456"),
        ("", "****"),
    ],
)
def test_mask_credentials(value: str, masked: str) -> None:
    assert mask_credentials(value) == masked
