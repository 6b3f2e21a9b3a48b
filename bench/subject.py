"""What every consumer subject of the bench shares: its event loop and its throughput marks.

The subjects (``floors/raw_consumer.py``, ``consumers/courier_runner.py``,
``consumers/faststream_consumer.py``) run as scripts, each in a process of its own; they
import this module by the repository's path, so that the three measure alike.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
LOOPS = ("uvloop", "asyncio")


def run(main: Coroutine[Any, Any, T], loop: str) -> T:
    """*main* on a new event loop of the kind *loop* names (uvloop or asyncio)."""
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: the module of the running loop's class."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def arguments(description: str | None) -> argparse.ArgumentParser:
    """The command line every subject takes (where, what, how many, which loop)."""
    parser = argparse.ArgumentParser(description=(description or "").splitlines()[0])
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefetch", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--loop", choices=LOOPS, default="uvloop", help="event loop")
    return parser


class Marks:
    """Throughput between the 10% and the 90% mark of *count* messages (start-up and tail
    excluded), and this process's CPU time over the same stretch."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.seen = 0
        self.low_mark = max(1, count // 10)
        self.high_mark = count - count // 10
        self._low = self._high = (0.0, 0.0)
        self.done = asyncio.Event()

    def tick(self) -> None:
        """One more message handled."""
        self.seen += 1
        if self.seen == self.low_mark:
            self._low = (time.perf_counter(), time.process_time())
        if self.seen == self.high_mark:
            self._high = (time.perf_counter(), time.process_time())
        if self.seen >= self.count:
            self.done.set()

    def result(self) -> dict[str, float]:
        """``{"count", "seconds", "msg_per_s", "cpu_ms_per_msg"}``, the line a subject prints."""
        seconds = max(self._high[0] - self._low[0], 1e-9)
        between = self.high_mark - self.low_mark
        return {
            "count": float(self.seen),
            "seconds": seconds,
            "msg_per_s": between / seconds,
            "cpu_ms_per_msg": 1000 * (self._high[1] - self._low[1]) / between,
        }
