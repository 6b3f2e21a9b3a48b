"""Sink fixtures: each test gets its own sinks on free ports, storing under its tmp_path.

Ports are always 0 (free ones), never the ``make run`` defaults 1025/8025/8030, which a
developer's running stack may hold.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from courier_sinks import HttpSink, SinkControl, SmtpSink


@pytest.fixture
def smtp_sink(tmp_path: Path) -> Iterator[SmtpSink]:
    with SmtpSink("127.0.0.1", 0, tmp_path / "sinks" / "smtp.jsonl", control_port=0) as sink:
        yield sink


@pytest.fixture
def smtp_control(smtp_sink: SmtpSink) -> Iterator[SinkControl]:
    assert smtp_sink.control_url is not None
    with SinkControl(smtp_sink.control_url) as control:
        yield control


@pytest.fixture
def http_sink(tmp_path: Path) -> Iterator[HttpSink]:
    with HttpSink("127.0.0.1", 0, tmp_path / "sinks" / "http.jsonl") as sink:
        yield sink


@pytest.fixture
def http_control(http_sink: HttpSink) -> Iterator[SinkControl]:
    with SinkControl(http_sink.url) as control:
        yield control


@pytest.fixture
def client(http_sink: HttpSink) -> Iterator[httpx.Client]:
    """A plain HTTP client on the HTTP sink, as a provider SDK would be."""
    with httpx.Client(base_url=http_sink.url, timeout=5.0) as http:
        yield http
