"""What the two sinks share as Python objects: a store, a switch, and start/stop in a thread."""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from courier_sinks.failures import FailureSwitch, HttpFailure, SmtpFailure
from courier_sinks.serving import BackgroundLoop
from courier_sinks.store import RecordStore

R = TypeVar("R")
F = TypeVar("F", SmtpFailure, HttpFailure)


class SinkBase(ABC, Generic[R, F]):
    """A sink whose servers run on a `BackgroundLoop`; usable as a context manager.

    `start` binds every socket first, in the caller's thread, so a busy port raises
    `OSError` right there; it returns once every server answers.
    """

    def __init__(self, name: str, store_path: Path | str | None) -> None:
        self.store: RecordStore[R] = RecordStore(store_path)
        self.switch: FailureSwitch[F] = FailureSwitch()
        self._name = name
        self._loop: BackgroundLoop | None = None
        self._sockets: list[socket.socket] = []

    @property
    def store_path(self) -> Path | None:
        return self.store.path

    @abstractmethod
    def _bind(self) -> list[socket.socket]:
        """Bind every listening socket the sink needs (called before anything starts)."""

    @abstractmethod
    async def _serve(self) -> None:
        """Start the servers on the sockets from `_bind`; runs on the sink's loop."""

    @abstractmethod
    async def _shutdown(self) -> None:
        """Stop the servers; runs on the sink's loop."""

    def start(self) -> Self:
        if self._loop is not None:
            raise RuntimeError(f"{self._name} is already running")
        self._sockets = self._bind()
        loop = BackgroundLoop(self._name)
        loop.start()
        self._loop = loop
        try:
            loop.run(self._serve())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop serving and release the ports; safe to call twice."""
        loop, self._loop = self._loop, None
        if loop is not None:
            try:
                loop.run(self._shutdown())
            finally:
                loop.close()
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def failure(self) -> dict[str, Any]:
        """The failure switch's state, as ``GET /_sink/fail`` shows it."""
        return self.switch.state()

    def clear_failures(self) -> None:
        self.switch.clear()

    def clear(self) -> None:
        """Forget every record, in memory and in the file."""
        self.store.clear()
