"""The console scripts as processes: one banner line, real servers, exit 0 on SIGTERM/SIGINT."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import httpx
import pytest

from courier_sinks import SinkControl, SmtpSink, cli

STARTUP_SECONDS = 15
EXIT_SECONDS = 10


class SinkProcess:
    """A console script started in *cwd*; `banner` is its first stdout line."""

    def __init__(
        self, script: str, args: list[str], cwd: Path, env: Mapping[str, str] | None = None
    ) -> None:
        executable = Path(sys.executable).with_name(script)
        assert executable.exists(), f"{script} is not installed next to {sys.executable}"
        clean_env = {k: v for k, v in os.environ.items() if not k.startswith("COURIER_SINK_")}
        self.stderr_path = cwd / f"{script}.stderr"
        with self.stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(
                [str(executable), *args],
                cwd=cwd,
                env={**clean_env, **(env or {})},
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.banner = self._first_line()

    def _first_line(self) -> str:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], STARTUP_SECONDS)
        if not ready:
            self.process.kill()
            pytest.fail(f"no banner within {STARTUP_SECONDS}s; stderr: {self.stderr}")
        return self.process.stdout.readline().rstrip("\n")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def rest_of_stdout(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.read()


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[SinkProcess]]:
    """Processes a test starts; killed afterwards if the test did not stop them."""
    processes: list[SinkProcess] = []
    yield processes
    for sink in processes:
        if sink.process.poll() is None:
            sink.process.kill()
            sink.process.wait()
        if sink.process.stdout is not None:
            sink.process.stdout.close()


SMTP_BANNER = re.compile(
    r"smtp-sink: SMTP on 127\.0\.0\.1:(?P<port>\d+), "
    r"control (?P<control>http://127\.0\.0\.1:\d+)/_sink/messages, storing (?P<store>.+?)"
    r"(?:, answering after (?P<delay>\d+) ms)?(?P<lean>, lean records \(no MIME parse\))?$"
)
HTTP_BANNER = re.compile(
    r"http-sink: HTTP on (?P<url>http://127\.0\.0\.1:\d+) \(POST /sms, /push or any /<path>\), "
    r"control (?P=url)/_sink/requests, storing (?P<store>.+?)(?P<auth>, bearer token required)?$"
)


async def test_smtp_sink_process(tmp_path: Path, started: list[SinkProcess]) -> None:
    sink = SinkProcess("courier-smtp-sink", ["--port", "0", "--control-port", "0"], tmp_path)
    started.append(sink)
    match = SMTP_BANNER.match(sink.banner)
    assert match, sink.banner
    assert not match["delay"]
    assert not match["lean"]
    # The default store is relative to the working directory, its folders created.
    assert match["store"] == "var/sinks/smtp.jsonl"
    store = tmp_path / "var" / "sinks" / "smtp.jsonl"
    assert store.exists()

    message = EmailMessage()
    message["From"] = "noreply@courier.test"
    message["To"] = "ada@example.com"
    message["Subject"] = "Grüße"
    message["Message-ID"] = "<cli-test@courier.test>"
    message.set_content("hello")
    with SinkControl(match["control"]) as control:
        control.fail_next(1, code=451)
        with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
            await aiosmtplib.send(message, hostname="127.0.0.1", port=int(match["port"]))
        assert refused.value.code == 451
        await aiosmtplib.send(message, hostname="127.0.0.1", port=int(match["port"]))
        [stored] = control.messages()
    assert stored["subject"] == "Grüße"
    assert json.loads(store.read_text(encoding="utf-8")) == stored

    assert sink.stop(signal.SIGTERM) == 0
    assert sink.rest_of_stdout() == ""  # the banner is the only stdout line
    assert "smtp-sink: accepted <cli-test@courier.test> for 1 recipient(s)" in sink.stderr
    assert "ada@example.com" not in sink.stderr


def test_http_sink_process_from_the_environment(tmp_path: Path, started: list[SinkProcess]) -> None:
    store = tmp_path / "deep" / "er" / "http.jsonl"
    env = {
        "COURIER_SINK_HTTP_PORT": "0",
        "COURIER_SINK_HTTP_STORE": str(store),
        "COURIER_SINK_HTTP_TOKEN": "sk_test_0123456789abcd",
    }
    sink = SinkProcess("courier-http-sink", [], tmp_path, env)
    started.append(sink)
    match = HTTP_BANNER.match(sink.banner)
    assert match, sink.banner
    assert match["store"] == str(store)
    assert match["auth"]

    url = match["url"]
    assert httpx.post(f"{url}/sms", json={"to": "x"}).status_code == 401
    authorized = {"Authorization": "Bearer sk_test_0123456789abcd", "Idempotency-Key": "k"}
    first = httpx.post(f"{url}/sms", json={"to": "x"}, headers=authorized)
    again = httpx.post(f"{url}/sms", json={"to": "x"}, headers=authorized)
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    with SinkControl(url) as control:
        assert [(r["status"], r["replay"]) for r in control.requests()] == [
            (401, False),
            (202, False),
            (202, True),
        ]
    assert len(store.read_text().splitlines()) == 3

    assert sink.stop(signal.SIGINT) == 0
    assert "http-sink: POST /sms -> 202 (replay)" in sink.stderr


def test_memory_only_store_and_a_busy_port(tmp_path: Path, started: list[SinkProcess]) -> None:
    sink = SinkProcess("courier-http-sink", ["--port", "0", "--store", ""], tmp_path)
    started.append(sink)
    match = HTTP_BANNER.match(sink.banner)
    assert match, sink.banner
    assert match["store"] == "in memory"
    assert not match["auth"]
    port = match["url"].rsplit(":", 1)[1]

    busy = SinkProcess("courier-http-sink", ["--port", port, "--store", ""], tmp_path)
    started.append(busy)
    assert busy.banner == ""  # no banner: it exited instead
    assert busy.process.wait(EXIT_SECONDS) == 1
    assert "http-sink: cannot listen:" in busy.stderr
    assert sink.stop() == 0


def test_smtp_control_port_in_use(tmp_path: Path, started: list[SinkProcess]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = str(holder.getsockname()[1])
        sink = SinkProcess(
            "courier-smtp-sink",
            ["--port", "0", "--control-port", port, "--store", ""],
            tmp_path,
        )
        started.append(sink)
        assert sink.process.wait(EXIT_SECONDS) == 1
    assert "smtp-sink: cannot listen:" in sink.stderr


async def test_slow_lean_smtp_sink_process_from_the_environment(
    tmp_path: Path, started: list[SinkProcess]
) -> None:
    env = {
        "COURIER_SINK_SMTP_PORT": "0",
        "COURIER_SINK_SMTP_CONTROL_PORT": "0",
        "COURIER_SINK_SMTP_STORE": "",
        "COURIER_SINK_SMTP_DELAY_MS": "300",
        "COURIER_SINK_SMTP_PARSE": "0",
    }
    sink = SinkProcess("courier-smtp-sink", [], tmp_path, env)
    started.append(sink)
    match = SMTP_BANNER.match(sink.banner)
    assert match, sink.banner
    assert match["store"] == "in memory"
    assert match["delay"] == "300"
    assert match["lean"]

    message = EmailMessage()
    message["From"] = "noreply@courier.test"
    message["To"] = "ada@example.com"
    message["Subject"] = "Grüße"
    message["Message-ID"] = "<lean-cli-test@courier.test>"
    message.set_content("hello")
    before = time.monotonic()
    await aiosmtplib.send(message, hostname="127.0.0.1", port=int(match["port"]))
    assert time.monotonic() - before >= 0.3
    with SinkControl(match["control"]) as control:
        [stored] = control.messages()
    assert stored["subject"] == "Grüße"
    assert stored["message_id"] == "<lean-cli-test@courier.test>"
    assert (stored["headers"], stored["text"]) == ({}, None)
    assert sink.stop() == 0
    assert "smtp-sink: accepted <lean-cli-test@courier.test> for 1 recipient(s)" in sink.stderr


@pytest.fixture
def smtp_options(monkeypatch: pytest.MonkeyPatch) -> list[SmtpSink]:
    """`courier-smtp-sink`'s option parsing, in process: the sinks it would have served."""
    for name in os.environ:
        if name.startswith("COURIER_SINK_"):
            monkeypatch.delenv(name)
    built: list[SmtpSink] = []

    def serve(_name: str, sink: SmtpSink, _banner: object) -> int:
        built.append(sink)
        return 0

    monkeypatch.setattr(cli, "_serve_with", serve)
    monkeypatch.setattr(cli, "_configure_logging", lambda _level: None)
    return built


@pytest.mark.parametrize(
    ("argv", "env", "delay_ms", "parse"),
    [
        ([], {}, 0, True),
        (["--delay-ms", "20", "--no-parse"], {}, 20, False),
        (["--delay-ms=600000", "--parse"], {}, 600_000, True),
        ([], {"COURIER_SINK_SMTP_DELAY_MS": "15", "COURIER_SINK_SMTP_PARSE": "0"}, 15, False),
        ([], {"COURIER_SINK_SMTP_PARSE": "Yes"}, 0, True),
        ([], {"COURIER_SINK_SMTP_PARSE": "off"}, 0, False),
        # The option wins over the environment.
        (
            ["--parse", "--delay-ms", "0"],
            {"COURIER_SINK_SMTP_PARSE": "false", "COURIER_SINK_SMTP_DELAY_MS": "9"},
            0,
            True,
        ),
    ],
)
def test_smtp_delay_and_parse_options(
    smtp_options: list[SmtpSink],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    env: dict[str, str],
    delay_ms: int,
    parse: bool,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.smtp_main(["--port", "0", "--control-port", "0", "--store", "", *argv]) == 0
    [sink] = smtp_options
    assert (sink.delay_ms, sink.parse) == (delay_ms, parse)


@pytest.mark.parametrize(
    ("argv", "env", "error"),
    [
        (["--delay-ms", "-1"], {}, "argument --delay-ms: must be a whole number of milliseconds"),
        (["--delay-ms", "600001"], {}, "from 0 to 600000"),
        (["--delay-ms", "1.5"], {}, "not '1.5'"),
        ([], {"COURIER_SINK_SMTP_DELAY_MS": "soon"}, "COURIER_SINK_SMTP_DELAY_MS), not 'soon'"),
        ([], {"COURIER_SINK_SMTP_PARSE": "maybe"}, "COURIER_SINK_SMTP_PARSE must be"),
    ],
)
def test_bad_smtp_delay_and_parse_options(
    smtp_options: list[SmtpSink],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    env: dict[str, str],
    error: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        cli.smtp_main(["--port", "0", "--store", "", *argv])
    assert exited.value.code == 2
    assert error in capsys.readouterr().err
    assert smtp_options == []
