"""Floor: raw aio-pika consume from a quorum queue, no Courier code.

Prefetch N (100 by default), and for every message one Redis ``SET NX PX`` (the claim an
idempotent consumer makes) and an ack. It consumes ``--count`` messages, then prints one JSON
line and exits:

* throughput mode: ``{"count", "seconds", "msg_per_s", "cpu_ms_per_msg"}``, timed between
  the 10% and the 90% mark of ``--count`` acks (start-up and tail excluded, as in the
  Courier case that it is compared with), CPU time of this process over the same stretch;
* ``--latency``: each message's ``sent_at_us`` header (epoch microseconds, set by the paced
  publisher)
  to its ack: ``{"count", "p50_ms", "p99_ms", "max_ms"}``.

Before consuming it prints ``{"ready": true, "loop": ...}`` (the event loop's module: uvloop
or asyncio). ``--loop`` picks the loop (uvloop by default, the loop uvicorn gives Courier's
services; ``asyncio`` for the standard library's); ``--passive`` consumes a queue that exists
already (a Courier work queue, declared with more arguments by whoever preloaded it) instead
of declaring a plain quorum queue.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
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


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round((len(ordered) - 1) * pct / 100)))
    return ordered[index]


async def consume(args: argparse.Namespace) -> dict[str, float]:
    redis = Redis(
        connection_pool=BlockingConnectionPool.from_url(args.redis_url, max_connections=64)
    )
    connection = await aio_pika.connect_robust(args.amqp_url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=args.prefetch)
    if args.passive:
        queue = await channel.declare_queue(args.queue, passive=True)
    else:
        queue = await channel.declare_queue(
            args.queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
    done = asyncio.Event()
    seen = 0
    low_mark, high_mark = max(1, args.count // 10), args.count - args.count // 10
    low_time = high_time = low_cpu = high_cpu = 0.0
    latencies: list[float] = []

    async def on_message(message: AbstractIncomingMessage) -> None:
        nonlocal seen, low_time, high_time, low_cpu, high_cpu
        key = f"{args.prefix}floor-claim:{message.message_id}"
        await redis.set(key, "1", nx=True, px=600_000)
        await message.ack()
        if args.latency:
            sent_at_us = (message.headers or {}).get("sent_at_us", 0)
            assert isinstance(sent_at_us, int)
            latencies.append(time.time() - sent_at_us / 1e6)
        seen += 1
        if seen == low_mark:
            low_time, low_cpu = time.perf_counter(), time.process_time()
        if seen == high_mark:
            high_time, high_cpu = time.perf_counter(), time.process_time()
        if seen >= args.count:
            done.set()

    await queue.consume(on_message)
    sys.stdout.write(json.dumps({"ready": True, "loop": loop_name()}) + "\n")
    sys.stdout.flush()
    try:
        await asyncio.wait_for(done.wait(), args.timeout)
    finally:
        await connection.close()
        await redis.aclose()
    if args.latency:
        millis = [x * 1000 for x in latencies]
        return {
            "count": float(len(millis)),
            "p50_ms": _percentile(millis, 50),
            "p99_ms": _percentile(millis, 99),
            "max_ms": max(millis),
        }
    seconds = max(high_time - low_time, 1e-9)
    return {
        "count": float(seen),
        "seconds": seconds,
        "msg_per_s": (high_mark - low_mark) / seconds,
        "cpu_ms_per_msg": 1000 * (high_cpu - low_cpu) / (high_mark - low_mark),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefetch", type=int, default=100)
    parser.add_argument("--latency", action="store_true")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--loop", choices=LOOPS, default="uvloop", help="event loop")
    parser.add_argument("--passive", action="store_true", help="the queue exists: no declare")
    args = parser.parse_args()
    result = run(consume(args), args.loop)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
