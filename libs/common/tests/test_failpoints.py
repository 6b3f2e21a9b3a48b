"""Failpoints: COURIER_FAILPOINTS parsing, its errors, and the SIGKILL on the N-th hit."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio

from courier_common import failpoints
from courier_common.failpoints import FAILPOINTS, FailpointError, configure, failpoint, parse
from courier_common.messaging import IdempotencyStore

SRC = Path(failpoints.__file__).resolve().parent
#: Where failpoints are called: the library and the services.
SOURCES = (SRC, *sorted((SRC.parents[3] / "services").glob("*/src")))


@pytest.fixture(autouse=True)
def _disarmed() -> Iterator[None]:
    configure(None)
    yield
    configure(None)


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Where the process would have been killed, instead of killing the test run."""
    seen: list[tuple[str, int]] = []
    monkeypatch.setattr(failpoints, "_kill", lambda name, hit: seen.append((name, hit)))
    return seen


def run_python(code: str, spec: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != failpoints.ENV_VAR}
    if spec is not None:
        env[failpoints.ENV_VAR] = spec
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )


# --- parsing ----------------------------------------------------------------------------------


def test_parse_reads_names_and_the_hit_that_kills() -> None:
    spec = " idempotency.before_effect=kill@3 , consumer.before_ack = kill "
    assert parse(spec) == {"idempotency.before_effect": 3, "consumer.before_ack": 1}


@pytest.mark.parametrize("spec", ["", "   "])
def test_an_empty_value_arms_nothing(spec: str) -> None:
    assert parse(spec) == {}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("idempotency.before_efect=kill", "unknown failpoint 'idempotency.before_efect'"),
        ("consumer.before_ack", "is not name=kill[@N]"),
        ("=kill", "is not name=kill[@N]"),
        ("consumer.before_ack=kill,", "is not name=kill[@N]"),
        ("consumer.before_ack=panic", "the action must be kill or kill@N"),
        ("consumer.before_ack=kill@0", "the action must be kill or kill@N"),
        ("consumer.before_ack=kill@-1", "the action must be kill or kill@N"),
        ("consumer.before_ack=kill@two", "the action must be kill or kill@N"),
        ("consumer.before_ack=kill@1,consumer.before_ack=kill@2", "given twice"),
    ],
)
def test_unknown_names_and_malformed_values_are_refused(spec: str, message: str) -> None:
    with pytest.raises(FailpointError, match=re.escape(message)):
        parse(spec)
    with pytest.raises(FailpointError):
        configure(spec)


def test_the_error_lists_the_known_failpoints() -> None:
    with pytest.raises(FailpointError) as error:
        parse("nowhere=kill")
    assert all(name in str(error.value) for name in FAILPOINTS)


def test_every_call_site_names_a_known_failpoint_and_every_one_is_used() -> None:
    used: set[str] = set()
    for path in (p for root in SOURCES for p in root.rglob("*.py")):
        if path.name != "failpoints.py":
            used |= set(re.findall(r"""\bfailpoint\(["']([^"']+)["']\)""", path.read_text()))
    assert used == set(FAILPOINTS)


# --- hits -------------------------------------------------------------------------------------


def test_unarmed_failpoints_do_nothing(kills: list[tuple[str, int]]) -> None:
    for name in FAILPOINTS:
        failpoint(name)
    assert failpoints.armed() == {}
    assert kills == []


def test_only_the_nth_hit_of_the_armed_failpoint_fires(kills: list[tuple[str, int]]) -> None:
    configure("idempotency.after_effect=kill@3")
    for _ in range(5):
        failpoint("idempotency.before_effect")
        failpoint("idempotency.after_effect")
    assert kills == [("idempotency.after_effect", 3)]


def test_configure_rearms_from_zero(kills: list[tuple[str, int]]) -> None:
    configure("consumer.before_ack=kill@2")
    failpoint("consumer.before_ack")
    configure("consumer.before_ack=kill@2")
    failpoint("consumer.before_ack")
    assert kills == []
    configure(None)
    failpoint("consumer.before_ack")
    assert kills == []


async def test_run_once_passes_before_effect_then_after_effect_around_the_effect(
    redis_client: redis.asyncio.Redis, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = IdempotencyStore(redis_client, prefix=redis_prefix, lease_seconds=5)
    key = store.key("c", "evt-failpoint", "email")
    order: list[str] = []
    monkeypatch.setattr(failpoints, "_kill", lambda name, hit: order.append(name))
    configure("idempotency.before_effect=kill,idempotency.after_effect=kill")

    async def effect() -> str:
        order.append("effect")
        return "sent"

    assert await store.run_once(key, effect) == "sent"
    assert order == ["idempotency.before_effect", "effect", "idempotency.after_effect"]
    assert await store.is_done(key)
    assert await store.run_once(key, effect) is None  # done: no effect, no failpoint
    assert order == ["idempotency.before_effect", "effect", "idempotency.after_effect"]


# --- in a real process ------------------------------------------------------------------------

COUNT_HITS = """
from courier_common.failpoints import failpoint
for n in range(1, 4):
    print(f"hit {n}", flush=True)
    failpoint("consumer.before_ack")
print("survived", flush=True)
"""


def test_the_nth_hit_sigkills_the_process() -> None:
    done = run_python(COUNT_HITS, "consumer.before_ack=kill@2")
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert "hit 1\nhit 2\n" in done.stdout
    assert "hit 3" not in done.stdout
    assert "survived" not in done.stdout
    assert "failpoint_kill" in done.stdout + done.stderr  # the last word before the kill


def test_without_the_variable_the_process_runs_through() -> None:
    done = run_python(COUNT_HITS, None)
    assert done.returncode == 0, done.stderr
    assert "survived" in done.stdout


def test_a_bad_value_stops_the_process_at_start() -> None:
    done = run_python("import courier_common.messaging", "consumer.before_ak=kill@1")
    assert done.returncode == 1
    assert "FailpointError" in done.stderr
    assert "COURIER_FAILPOINTS: unknown failpoint 'consumer.before_ak'" in done.stderr
