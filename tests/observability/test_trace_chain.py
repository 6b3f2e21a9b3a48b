"""One registration is one trace, from the HTTP request to the dead-letter archive; a replay is
another trace, the operator's, linked to it. Log lines point at the spans they were written in.

The three services run as processes (their console scripts) exporting OTLP/gRPC to a receiver in
this process. One user registers for email, SMS and push; the SMS provider answers 503 once (a
retry hop) and the push provider 410 until told otherwise (a dead letter). Once the dead letter
is archived, push is healed and the dead letter replayed through the archiver's API.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from courier_common.messaging.retry import format_delay
from courier_common.messaging.tracing import (
    MESSAGING_DESTINATION_NAME,
    MESSAGING_MESSAGE_ID,
    MESSAGING_OPERATION_TYPE,
    MESSAGING_SYSTEM,
)
from courier_common.tracing import ERROR_TYPE, SERVER_ADDRESS, SERVER_PORT
from courier_sinks.http import HttpSink
from courier_sinks.smtp import SmtpSink
from courier_testing.otlp import (
    ReceivedSpan,
    TraceReceiver,
    children_of,
    disconnected,
    otlp_env,
    otlp_receiver,
)
from courier_testing.polling import eventually
from notification_service.routes import USER_EVENTS_QUEUE
from tests.support.archiver import ADMIN, wait_records
from tests.support.chain import SERVICES, start_chain
from tests.support.processes import ServiceProcess, ServiceRunner
from tests.support.stack import RETRY_DELAYS

pytestmark = pytest.mark.slow

TOKEN = "sink-token"
WORK_QUEUE = USER_EVENTS_QUEUE
FIRST_RETRY_QUEUE = f"{WORK_QUEUE}.retry.{format_delay(timedelta(seconds=RETRY_DELAYS[0]))}"
CHANNELS = ("email", "sms", "push")
OUTCOME = "courier.notification.outcome"


@pytest.fixture
def otlp() -> Iterator[tuple[TraceReceiver, int]]:
    with otlp_receiver() as served:
        yield served


@pytest.fixture
def push_sink(tmp_path: Path) -> Iterator[HttpSink]:
    """The push provider on its own sink, so it can fail while SMS (on ``http_sink``) fails
    differently: a sink has one failure switch."""
    with HttpSink(store_path=tmp_path / "push.jsonl", token=TOKEN) as sink:
        yield sink


@dataclass
class Traced:
    """The three services as processes, exporting their spans to ``receiver``."""

    receiver: TraceReceiver
    processes: dict[str, ServiceProcess]

    @property
    def users(self) -> ServiceProcess:
        return self.processes["user-service"]

    @property
    def notifier(self) -> ServiceProcess:
        return self.processes["notification-service"]

    @property
    def archiver(self) -> ServiceProcess:
        return self.processes["dlq-archiver"]

    async def register(self, email: str, channels: tuple[str, ...], **extra: str) -> None:
        body = {"email": email, "display_name": "Ada", "locale": "en", "channels": channels}
        async with httpx.AsyncClient(base_url=self.users.url, timeout=10) as client:
            response = await client.post("/v1/users", json={**body, **extra})
        assert response.status_code == 201, response.text


@pytest.fixture
def traced(
    services: ServiceRunner,
    otlp: tuple[TraceReceiver, int],
    amqp_url: str,
    redis_url: str,
    redis_prefix: str,
    smtp_sink: SmtpSink,
    http_sink: HttpSink,
    push_sink: HttpSink,
) -> Traced:
    """SMS goes to ``http_sink``, push to ``push_sink``, email to ``smtp_sink``."""
    receiver, port = otlp
    named = {name: {"OTEL_SERVICE_NAME": name} for name in SERVICES}
    named["notification-service"]["COURIER_PUSH_URL"] = f"{push_sink.url}/push"
    chain = start_chain(
        services,
        amqp_url=amqp_url,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        smtp_sink=smtp_sink,
        http_sink=http_sink,
        extra_env=otlp_env(port),
        service_env=named,
    )
    processes = chain.processes
    return Traced(receiver, processes)


def in_trace_of(spans: list[ReceivedSpan], kind: str, name: str) -> list[ReceivedSpan]:
    """Every span in the trace of the first *kind* span called *name* (none if there is none)."""
    roots = [s for s in spans if s.kind == kind and s.name == name]
    return [s for s in spans if roots and s.trace_id == roots[0].trace_id]


# --- reading spans and logs -------------------------------------------------------------------


def connected(spans: list[ReceivedSpan]) -> bool:
    return bool(spans) and not disconnected(spans, spans[0].trace_id)


async def settle(check: Callable[[], bool], what: str) -> None:
    """Wait for spans that other processes export in batches; on a timeout, carry on so that the
    assertions that follow say what is missing or disconnected, rather than just "timed out"."""
    with contextlib.suppress(pytest.fail.Exception):
        await eventually(check, timeout=30, what=what)


def only(spans: list[ReceivedSpan], **where: str) -> ReceivedSpan:
    """The one span whose fields (``name``, ``kind``, ``service``...) match *where*."""
    found = [s for s in spans if all(getattr(s, key) == value for key, value in where.items())]
    assert len(found) == 1, f"{len(found)} spans match {where}:\n" + "\n".join(map(str, spans))
    return found[0]


def sends(spans: list[ReceivedSpan], process: ReceivedSpan) -> dict[str, ReceivedSpan]:
    """channel → the ``send <channel>`` CLIENT span under one process span."""
    found = {
        str(s.attributes["courier.notification.channel"]): s
        for s in children_of(spans, process)
        if s.kind == "CLIENT"
    }
    assert sorted(found) == sorted(CHANNELS), [str(s) for s in children_of(spans, process)]
    for channel, span in found.items():
        assert span.name == f"send {channel}"
        assert span.service == "notification-service"
    return found


def assert_messaging(span: ReceivedSpan, *, destination: str, message_id: str) -> None:
    operation = {"PRODUCER": "send", "CONSUMER": "process"}[span.kind]
    assert span.attributes[MESSAGING_SYSTEM] == "rabbitmq", span
    assert span.attributes[MESSAGING_OPERATION_TYPE] == operation, span
    assert span.attributes[MESSAGING_DESTINATION_NAME] == destination, span
    assert span.attributes[MESSAGING_MESSAGE_ID] == message_id, span


def log_lines(process: ServiceProcess) -> list[dict[str, Any]]:
    """The JSON lines a service wrote (its output also holds the odd non-JSON line)."""
    lines = []
    for raw in process.log_path.read_text(errors="replace").splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict):
            lines.append(line)
    return lines


def logged(process: ServiceProcess, event: str, **fields: object) -> dict[str, Any]:
    """The one JSON line *process* wrote for *event* with *fields*."""
    found = [
        line
        for line in log_lines(process)
        if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())
    ]
    assert len(found) == 1, f"{len(found)} {event} lines with {fields}:\n{process.logs()}"
    return found[0]


def assert_logged_in(
    span: ReceivedSpan, process: ServiceProcess, event: str, **fields: object
) -> None:
    line = logged(process, event, **fields)
    assert (line.get("trace_id"), line.get("span_id")) == (span.trace_id, span.span_id), (
        f"{event} was logged with {line.get('trace_id')}/{line.get('span_id')}, not in {span}"
    )


# --- the test ---------------------------------------------------------------------------------


async def test_a_registration_is_one_trace_and_its_replay_links_to_it(
    traced: Traced, smtp_sink: SmtpSink, http_sink: HttpSink, push_sink: HttpSink
) -> None:
    receiver, users, notifier, archiver = (
        traced.receiver,
        traced.users,
        traced.notifier,
        traced.archiver,
    )
    http_sink.fail_next(1, 503, path="/sms")
    push_sink.fail_next(1000, 410, path="/push", message="push token unregistered")

    async with httpx.AsyncClient(base_url=archiver.url, timeout=10) as archive_api:
        await traced.register(
            "ada@example.com", CHANNELS, phone="+14155552671", push_token="device-token-1"
        )
        (record,) = await wait_records(archive_api, 1, timeout=60)
        event_id = record["message_id"]

        # --- the registration's trace ---------------------------------------------------------
        def registration_spans() -> list[ReceivedSpan]:
            return in_trace_of(receiver.spans(), "SERVER", "POST /v1/users")

        expected = Counter(
            {
                ("user-service", "SERVER", "POST /v1/users"): 1,
                ("user-service", "PRODUCER", "publish courier.events"): 1,
                ("notification-service", "CONSUMER", f"process {WORK_QUEUE}"): 2,
                ("notification-service", "PRODUCER", f"publish {FIRST_RETRY_QUEUE}"): 1,
                ("notification-service", "PRODUCER", "publish courier.dlx"): 1,
                ("dlq-archiver", "CONSUMER", "process courier.dead-letters"): 1,
                **{("notification-service", "CLIENT", f"send {c}"): 2 for c in CHANNELS},
            }
        )

        def registration_complete() -> bool:
            spans = registration_spans()
            got = Counter((s.service, s.kind, s.name) for s in spans)
            return all(got[key] >= count for key, count in expected.items()) and connected(spans)

        await settle(registration_complete, "the registration's spans")
        trace_a = registration_spans()
        got = Counter((s.service, s.kind, s.name) for s in trace_a)
        assert {key: got[key] for key in expected} == dict(expected)
        assert disconnected(trace_a, trace_a[0].trace_id) == []

        server = only(trace_a, kind="SERVER")
        assert server.parent_span_id is None  # the registration starts the trace
        published = only(trace_a, kind="PRODUCER", service="user-service")
        assert published.parent_span_id == server.span_id
        assert_messaging(
            published, destination="courier.events:user.registered", message_id=event_id
        )

        processes = [s for s in trace_a if s.name == f"process {WORK_QUEUE}"]
        first = only(processes, parent_span_id=published.span_id)
        (second,) = (s for s in processes if s is not first)
        assert first.parent_span_id == published.span_id
        assert_messaging(
            first,
            destination=f"courier.events:user.registered:{WORK_QUEUE}",
            message_id=event_id,
        )
        first_sends = sends(trace_a, first)
        assert {c: s.attributes[OUTCOME] for c, s in first_sends.items()} == {
            "email": "sent",
            "sms": "retryable",
            "push": "permanent",
        }
        assert first_sends["sms"].status == "ERROR"
        assert first_sends["sms"].attributes[ERROR_TYPE] == "503"
        assert first_sends["push"].attributes[ERROR_TYPE] == "410"
        assert first_sends["email"].status == "UNSET"
        assert first_sends["email"].attributes[SERVER_ADDRESS] == "127.0.0.1"
        assert first_sends["email"].attributes[SERVER_PORT] == smtp_sink.port
        assert first_sends["sms"].attributes[SERVER_PORT] == http_sink.port
        assert first_sends["push"].attributes[SERVER_PORT] == push_sink.port
        assert {s.attributes["courier.notification.template"] for s in first_sends.values()} == {
            "welcome"
        }

        retry_hop = only(children_of(trace_a, first), kind="PRODUCER")
        assert retry_hop.name == f"publish {FIRST_RETRY_QUEUE}"
        assert_messaging(retry_hop, destination=FIRST_RETRY_QUEUE, message_id=event_id)
        assert second.parent_span_id == retry_hop.span_id  # the retry continues the trace
        assert_messaging(second, destination=WORK_QUEUE, message_id=event_id)
        second_sends = sends(trace_a, second)
        assert {c: s.attributes[OUTCOME] for c, s in second_sends.items()} == {
            "email": "skipped",
            "sms": "sent",
            "push": "permanent",
        }
        assert second_sends["push"].attributes[ERROR_TYPE] == "410"
        assert second.status == "ERROR"

        dead_letter = only(children_of(trace_a, second), kind="PRODUCER")
        assert dead_letter.name == "publish courier.dlx"
        assert_messaging(
            dead_letter, destination="courier.dlx:user.registered", message_id=event_id
        )
        archived = only(trace_a, service="dlq-archiver")
        assert archived.kind == "CONSUMER"
        assert archived.parent_span_id == dead_letter.span_id
        assert_messaging(
            archived,
            destination="courier.dlx:user.registered:courier.dead-letters",
            message_id=event_id,
        )
        assert archived.attributes["courier.dead_letter.record_id"] == record["id"]
        assert archived.attributes["courier.dead_letter.outcome"] == "archived"
        assert record["trace_id"] == server.trace_id

        # --- the replay: the operator's trace, linked to the registration's ----------------------
        push_sink.clear_failures()
        replayed = await archive_api.post(f"/v1/dead-letters/{record['id']}/replay", headers=ADMIN)
        assert replayed.status_code == 202, replayed.text
        replay_id = replayed.json()["replay_id"]

    def replay_spans() -> list[ReceivedSpan]:
        return in_trace_of(receiver.spans(), "SERVER", "POST /v1/dead-letters/{record_id}/replay")

    def replay_delivered() -> bool:
        spans = replay_spans()
        sent = any(s.name == "send push" and s.attributes.get(OUTCOME) == "sent" for s in spans)
        return sent and bool(push_sink.deliveries) and connected(spans)

    await settle(replay_delivered, "the replay's push and its spans")
    trace_b = replay_spans()
    assert trace_b[0].trace_id != server.trace_id
    assert disconnected(trace_b, trace_b[0].trace_id) == []

    request = only(trace_b, kind="SERVER")
    assert request.service == "dlq-archiver"
    assert request.name == "POST /v1/dead-letters/{record_id}/replay"
    assert request.parent_span_id is None
    replay = only(trace_b, name="replay dead letter")
    assert replay.parent_span_id == request.span_id
    assert replay.attributes["courier.dead_letter.record_id"] == record["id"]
    assert replay.attributes["courier.replay.id"] == replay_id
    (link,) = replay.links
    assert (link.trace_id, link.span_id) == (dead_letter.trace_id, dead_letter.span_id)
    assert link.attributes == {"courier.link.relation": "replay_of"}

    republished = only(children_of(trace_b, replay), kind="PRODUCER")
    assert republished.service == "dlq-archiver"
    # Back to the queue that failed, through the default exchange: no other consumer sees it.
    assert republished.name == f"publish {WORK_QUEUE}"
    assert_messaging(republished, destination=WORK_QUEUE, message_id=event_id)
    redelivered = only(trace_b, kind="CONSUMER")
    assert redelivered.parent_span_id == republished.span_id  # carries the replay's context
    replay_sends = sends(trace_b, redelivered)
    assert {c: s.attributes[OUTCOME] for c, s in replay_sends.items()} == {
        "email": "skipped",
        "sms": "skipped",
        "push": "sent",
    }
    # The replay added nothing to the registration's trace.
    assert len([s for s in receiver.spans() if s.trace_id == server.trace_id]) == len(trace_a)

    # --- log lines carry the ids of the span they were written in --------------------------------
    registered_line = logged(users, "user_registered")
    assert registered_line["trace_id"] == server.trace_id
    assert registered_line["span_id"] in {s.span_id for s in trace_a}
    assert_logged_in(first, notifier, "message_retried")
    assert_logged_in(first_sends["email"], notifier, "notification_sent", channel="email")
    assert_logged_in(second_sends["sms"], notifier, "notification_sent", channel="sms")
    assert_logged_in(second, notifier, "message_dead_lettered")
    assert_logged_in(archived, archiver, "dead_letter_archived")
    assert_logged_in(replay, archiver, "dead_letter_replayed")
    assert_logged_in(replay_sends["push"], notifier, "notification_sent", channel="push")
    assert_logged_in(redelivered, notifier, "message_acked")

    def every_traced_line_names_an_exported_span() -> bool:
        exported = {(s.trace_id, s.span_id) for s in receiver.spans()}
        return all(
            (line.get("trace_id"), line.get("span_id")) in exported
            for process in traced.processes.values()
            for line in log_lines(process)
            if "trace_id" in line or "span_id" in line
        )

    await eventually(
        every_traced_line_names_an_exported_span,
        timeout=10,
        what="every log line with a trace_id/span_id to name an exported span",
    )


async def test_a_bulk_replay_is_one_trace_linked_to_every_dead_letter_it_replays(
    traced: Traced, push_sink: HttpSink
) -> None:
    receiver = traced.receiver
    push_sink.fail_next(1000, 410, path="/push", message="push token unregistered")
    for n in range(2):
        await traced.register(f"user{n}@example.com", ("push",), push_token=f"device-{n}")

    async with httpx.AsyncClient(base_url=traced.archiver.url, timeout=10) as archive_api:
        dead = await wait_records(archive_api, 2, timeout=60)
        push_sink.clear_failures()
        started = await archive_api.post(
            "/v1/dead-letters/replay", json={"queue": WORK_QUEUE, "canary": 0}, headers=ADMIN
        )
        assert started.status_code == 202, started.text
        job_id = started.json()["id"]

        async def completed() -> bool:
            job = (await archive_api.get(f"/v1/replays/{job_id}")).json()
            return bool(job["status"] == "completed")

        await eventually(completed, timeout=30, what="the bulk replay to complete")

    def job_spans() -> list[ReceivedSpan]:
        return in_trace_of(receiver.spans(), "SERVER", "POST /v1/dead-letters/replay")

    def both_sent() -> bool:
        spans = job_spans()
        sent = [s for s in spans if s.name == "send push" and s.attributes.get(OUTCOME) == "sent"]
        job_done = any(s.name == "bulk replay" for s in spans)
        return len(sent) == 2 and job_done and connected(spans) and len(push_sink.deliveries) == 2

    await settle(both_sent, "both replays' sends in the job's trace")
    spans = job_spans()
    assert disconnected(spans, spans[0].trace_id) == []
    request = only(spans, kind="SERVER")
    job = only(children_of(spans, request), name="bulk replay")
    assert job.attributes["courier.replay.job_id"] == job_id
    assert job.attributes["courier.replay.job_total"] == 2
    replays = children_of(spans, job)
    assert [s.name for s in replays] == ["replay dead letter"] * 2
    # Each replay links to the trace its dead letter died in, one dead letter each.
    linked = {(r.attributes["courier.dead_letter.record_id"], r.links[0].trace_id) for r in replays}
    assert linked == {(record["id"], record["trace_id"]) for record in dead}
    for replay in replays:
        (published,) = children_of(spans, replay)
        assert published.kind == "PRODUCER"
        (processed,) = children_of(spans, published)
        assert processed.name == f"process {WORK_QUEUE}"
        assert str(replay.attributes["courier.replay.id"]).startswith(f"{job_id}.")
