"""Registrations in the background while a fault test breaks something underneath.

`RegistrationLoad` posts registrations one after another through the ledger (so each 201 is
in A), times each answer, and keeps every transport error apart: a request whose answer was
lost might have registered someone, which the ledger could then not account for.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import httpx

from tests.support.ledger import Ledger


@dataclass(frozen=True)
class Answer:
    """One registration: when it was sent (monotonic), how long it took, its status."""

    sent_at: float
    seconds: float
    status: int


@dataclass
class RegistrationLoad:
    """Registers users in a thread until *count* is reached or :meth:`stop` is called."""

    ledger: Ledger
    client: httpx.Client
    channels: tuple[str, ...] = ("email",)
    count: int | None = None
    pause: float = 0.0
    answers: list[Answer] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RegistrationLoad:
        self._thread = threading.Thread(target=self._run, name="registrations", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set() and (self.count is None or len(self.answers) < self.count):
            payload = self.ledger.new_payload(self.channels)
            started = time.monotonic()
            try:
                response = self.client.post("/v1/users", json=payload)
            except httpx.HTTPError as exc:
                self.errors.append(repr(exc))
                self.ledger.record_in_doubt(payload)
                continue
            self.answers.append(Answer(started, time.monotonic() - started, response.status_code))
            self.ledger.record(payload, response)
            if self.pause:
                self._stop.wait(self.pause)

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def wait_for(self, answered: int, timeout: float = 120) -> None:
        """Until at least *answered* registrations have been answered."""
        deadline = time.monotonic() + timeout
        while len(self.answers) < answered:
            assert not self.done, f"the load stopped after {len(self.answers)} registrations"
            assert time.monotonic() < deadline, f"{answered} registrations not answered in time"
            time.sleep(0.05)

    def stop(self, timeout: float = 120) -> None:
        """Stop (or, with a *count*, let it finish) and check no request went unanswered."""
        if self.count is None:
            self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the registrations did not finish in time"
        assert not self.errors, f"registrations without an answer: {self.errors[:5]}"

    def between(self, start: float, end: float) -> list[Answer]:
        """The registrations sent in [start, end] (monotonic seconds)."""
        return [a for a in self.answers if start <= a.sent_at <= end]
