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
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from redis.asyncio import BlockingConnectionPool, Redis

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: bench.subject
from bench.subject import Marks, arguments, loop_name, run


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
    marks = Marks(args.count)
    latencies: list[float] = []

    async def on_message(message: AbstractIncomingMessage) -> None:
        key = f"{args.prefix}floor-claim:{message.message_id}"
        await redis.set(key, "1", nx=True, px=600_000)
        await message.ack()
        if args.latency:
            sent_at_us = (message.headers or {}).get("sent_at_us", 0)
            assert isinstance(sent_at_us, int)
            latencies.append(time.time() - sent_at_us / 1e6)
        marks.tick()

    await queue.consume(on_message)
    sys.stdout.write(json.dumps({"ready": True, "loop": loop_name()}) + "\n")
    sys.stdout.flush()
    try:
        await asyncio.wait_for(marks.done.wait(), args.timeout)
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
    return marks.result()


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--latency", action="store_true")
    parser.add_argument("--passive", action="store_true", help="the queue exists: no declare")
    args = parser.parse_args()
    result = run(consume(args), args.loop)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
