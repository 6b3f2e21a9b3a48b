"""Reference: a FastStream consumer doing what the runner case's floor does, as a user writes it.

FastStream (a bench-only dependency, the ``bench`` dependency group) with its RabbitMQ broker:
one subscriber on ``--queue`` at ``--prefetch``, a typed handler whose body is a pydantic model
of Courier's envelope (FastStream decodes the JSON body and validates it, as Courier's runner
decodes its envelope strictly), one Redis ``SET NX PX`` per message keyed on the event id (the
claim an idempotent consumer makes; redis.asyncio with a ``BlockingConnectionPool``, as the raw
floor), and FastStream's own acknowledgement (its default policy: ack when the handler
returns). Its per-message access lines ("Received", "Processed") are demoted to DEBUG, below
its logger's INFO, so it does less than Courier, which writes one JSON line per outcome.

The queue is the Courier work queue ``bench.harness.preload_events`` declared (quorum,
delivery limit, dead-lettering): FastStream connects to it passively (``declare=False``), so
it can never fail on arguments that differ. FastStream's access logger writes to whatever
``sys.stdout`` is when the broker connects, so, as ``courier_runner.py`` does, stdout goes to
``--log-file`` and the result lines keep the real one: the same lines as
``bench/floors/raw_consumer.py`` (ready with the loop's name, then the throughput between the
10% and 90% marks). ``--loop`` as there: uvloop by default.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import IO, Any, TypeVar

from faststream.rabbit import Channel, QueueType, RabbitBroker, RabbitQueue
from pydantic import BaseModel
from redis.asyncio import BlockingConnectionPool, Redis

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


class UserRegistered(BaseModel):
    user_id: str
    email: str
    display_name: str
    locale: str
    channels: list[str]


class Envelope(BaseModel):
    """The CloudEvents-style envelope Courier publishes, the fields a consumer reads."""

    specversion: str
    id: str
    source: str
    type: str
    time: datetime
    data: UserRegistered


async def consume(args: argparse.Namespace, results: IO[str]) -> dict[str, float]:
    redis = Redis(
        connection_pool=BlockingConnectionPool.from_url(args.redis_url, max_connections=64)
    )
    broker = RabbitBroker(args.amqp_url, log_level=logging.DEBUG)
    queue = RabbitQueue(args.queue, queue_type=QueueType.QUORUM, declare=False)

    done = asyncio.Event()
    seen = 0
    low_mark, high_mark = max(1, args.count // 10), args.count - args.count // 10
    low_time = high_time = low_cpu = high_cpu = 0.0

    @broker.subscriber(queue, channel=Channel(prefetch_count=args.prefetch))
    async def on_registered(event: Envelope) -> None:
        nonlocal seen, low_time, high_time, low_cpu, high_cpu
        await redis.set(f"{args.prefix}faststream-claim:{event.id}", "1", nx=True, px=600_000)
        seen += 1
        if seen == low_mark:
            low_time, low_cpu = time.perf_counter(), time.process_time()
        if seen == high_mark:
            high_time, high_cpu = time.perf_counter(), time.process_time()
        if seen >= args.count:
            done.set()

    await broker.start()
    results.write(json.dumps({"ready": True, "loop": loop_name()}) + "\n")
    results.flush()
    try:
        await asyncio.wait_for(done.wait(), args.timeout)
    finally:
        await broker.stop()
        await redis.aclose()
    seconds = max(high_time - low_time, 1e-9)
    return {
        "count": float(seen),
        "seconds": seconds,
        "msg_per_s": (high_mark - low_mark) / seconds,
        "cpu_ms_per_msg": 1000 * (high_cpu - low_cpu) / (high_mark - low_mark),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefetch", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--log-file", required=True, help="where FastStream's log lines go")
    parser.add_argument("--loop", choices=LOOPS, default="uvloop", help="event loop")
    args = parser.parse_args()
    results = sys.stdout
    sys.stdout = open(args.log_file, "a", buffering=1)  # noqa: SIM115  # lives as long as we do
    result = run(consume(args, results), args.loop)
    results.write(json.dumps(result) + "\n")
    results.flush()


if __name__ == "__main__":
    main()
