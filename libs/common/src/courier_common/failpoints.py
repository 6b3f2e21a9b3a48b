"""Failpoints: kill the process at a named point in the code. A test and chaos facility.

Like etcd's gofail or TiKV's fail-rs: the code marks the places where dying is most
interesting with ``failpoint("name")``, and the environment says which of them fires::

    COURIER_FAILPOINTS="idempotency.before_effect=kill@3,consumer.before_ack=kill"

``name=kill@N`` SIGKILLs this process the N-th time it passes ``name`` (``kill`` alone: the
first time). A SIGKILL, not an exception: nothing unwinds, no ``finally`` runs, no connection
is closed, which is what the OOM killer or a lost node does. The fault suite
(``tests/faults/test_crash_points.py``) uses them to crash the notification worker at each
step of the idempotency protocol and prove that nothing is lost and nothing is sent twice
that did not have to be.

Never set it in production. Unset (or empty), a failpoint is one truth test of an empty dict
and does nothing else. The variable is read once, when this module is first imported, that
is when the service starts: an unknown name or a malformed value raises `FailpointError`
there, so a typo stops the process at start instead of quietly testing nothing.

The failpoints there are, and where they are, are listed in `FAILPOINTS`; a test checks that
every call site names one of them.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from courier_common.logging import get_logger

__all__ = ["ENV_VAR", "FAILPOINTS", "FailpointError", "armed", "configure", "failpoint", "parse"]

log = get_logger(__name__)

ENV_VAR: Final = "COURIER_FAILPOINTS"
"""The environment variable read at import: ``name=kill[@N]`` entries, comma-separated."""

FAILPOINTS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "idempotency.before_effect": (
            "IdempotencyStore.run_once holds the claim; the effect has not run (before send)"
        ),
        "idempotency.after_effect": (
            "the effect returned; the key is not marked done yet (after send, before done)"
        ),
        "consumer.before_ack": (
            "the handler succeeded, every effect is marked done; the delivery is not acked yet"
        ),
        "archiver.before_ack": (
            "dlq-archiver stored a dead letter (or found it stored); the delivery is not acked"
        ),
    }
)
"""Every failpoint in the code base, by name, with where it is."""

_ACTION = re.compile(r"kill(?:@(?P<at>[0-9]+))?")


class FailpointError(ValueError):
    """``COURIER_FAILPOINTS`` names an unknown failpoint or is malformed."""


@dataclass(slots=True)
class _Armed:
    at: int
    hits: int = 0


_armed: dict[str, _Armed] = {}
_lock = threading.Lock()


def parse(spec: str) -> dict[str, int]:
    """``"a=kill@3,b=kill"`` -> ``{"a": 3, "b": 1}``: the hit on which each one kills.

    Raises `FailpointError` for an unknown name, an action other than ``kill[@N]`` (N a
    positive integer), an entry without ``=`` or a name given twice.
    """
    plan: dict[str, int] = {}
    if not spec.strip():
        return plan
    for entry in spec.split(","):
        name, sep, action = (part.strip() for part in entry.partition("="))
        if not sep or not name:
            raise FailpointError(
                f"{ENV_VAR}: {entry.strip()!r} is not name=kill[@N] "
                f"(entries are separated by commas)"
            )
        if name not in FAILPOINTS:
            raise FailpointError(
                f"{ENV_VAR}: unknown failpoint {name!r}; known: {', '.join(sorted(FAILPOINTS))}"
            )
        if name in plan:
            raise FailpointError(f"{ENV_VAR}: failpoint {name!r} is given twice")
        match = _ACTION.fullmatch(action)
        at = int(match["at"]) if match and match["at"] is not None else 1
        if match is None or at < 1:
            raise FailpointError(
                f"{ENV_VAR}: {name}={action!r}: the action must be kill or kill@N, N >= 1"
            )
        plan[name] = at
    return plan


def configure(spec: str | None) -> None:
    """Arm exactly the failpoints in *spec* (``COURIER_FAILPOINTS`` syntax), hit counts at 0.

    None or an empty string disarms them all. The module calls it once at import with the
    environment's value; tests call it to arm and disarm in process.
    """
    plan = parse(spec or "")
    with _lock:
        _armed.clear()
        _armed.update({name: _Armed(at=at) for name, at in plan.items()})


def armed() -> dict[str, int]:
    """The armed failpoints and the hit on which each kills (empty when none is)."""
    with _lock:
        return {name: point.at for name, point in _armed.items()}


def failpoint(name: str) -> None:
    """Mark a failpoint: SIGKILL this process if *name* is armed and this is its N-th hit."""
    if not _armed:
        return
    point = _armed.get(name)
    if point is None:
        return
    with _lock:
        point.hits += 1
        fire = point.hits == point.at
    if fire:
        _kill(name, point.at)


def _kill(name: str, hit: int) -> None:
    log.critical("failpoint_kill", failpoint=name, hit=hit, pid=os.getpid())
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.kill(os.getpid(), signal.SIGKILL)


configure(os.environ.get(ENV_VAR))
