"""Where a sink keeps what it received: in memory for the API, one JSON line each on disk.

Both sinks are read from two sides at once: the server (an event loop in its own thread) appends,
while a test or a developer reads through the Python API or the control API. So the store is
guarded by one lock, hands out copies, and lets a reader wait for records that are still on
their way (a notification is sent by another process some time after the test triggered it).

The file is an append-only log for people: `tail -f var/sinks/smtp.jsonl | jq` while
`make run` is up. It is not read back at start-up, so the API shows what *this* process
received, while the file keeps earlier runs until someone clears the sink.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

__all__ = ["RecordStore", "utc_now"]

R = TypeVar("R")


def utc_now() -> str:
    """Now, for ``received_at``: ISO 8601 in UTC with a ``Z``, to the millisecond."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RecordStore(Generic[R]):
    """A thread-safe list of JSON-able records, mirrored to a JSON-lines file when given one."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
        self._records: list[R] = []
        self._changed = threading.Condition()

    def append(self, record: R) -> None:
        """Keep *record* and append it to the file as one line (UTF-8, non-ASCII kept as is).

        The file is opened per record rather than held open: a developer may truncate or
        delete it while the sink runs, and a sink killed with SIGKILL leaves whole lines.
        """
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        with self._changed:
            if self.path is not None:
                with self.path.open("a", encoding="utf-8") as file:
                    file.write(line)
            self._records.append(record)
            self._changed.notify_all()

    def all(self) -> list[R]:
        """A deep copy of every record, oldest first: callers may mutate what they get."""
        with self._changed:
            return copy.deepcopy(self._records)

    def __len__(self) -> int:
        with self._changed:
            return len(self._records)

    def clear(self) -> None:
        """Forget every record and empty the file, so both sides agree on "nothing yet"."""
        with self._changed:
            self._records.clear()
            if self.path is not None:
                self.path.write_text("", encoding="utf-8")
            self._changed.notify_all()

    def wait_for(
        self,
        count: int,
        *,
        timeout: float,
        where: Callable[[R], bool] | None = None,
    ) -> list[R]:
        """Block until at least *count* records (matching *where*) exist; return those.

        Raises `TimeoutError` naming how many arrived, which is usually the whole diagnosis.
        """
        deadline = time.monotonic() + timeout

        def matching() -> list[R]:
            return [r for r in self._records if where is None or where(r)]

        with self._changed:
            found = matching()
            while len(found) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"expected {count} record(s) within {timeout:g}s, got {len(found)}"
                    )
                self._changed.wait(remaining)
                found = matching()
            return copy.deepcopy(found)
