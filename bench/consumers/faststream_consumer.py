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
from datetime import datetime
from pathlib import Path
from typing import IO

from faststream.rabbit import Channel, QueueType, RabbitBroker, RabbitQueue
from pydantic import BaseModel
from redis.asyncio import BlockingConnectionPool, Redis

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: bench.subject
from bench.subject import Marks, arguments, loop_name, run


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

    marks = Marks(args.count)

    @broker.subscriber(queue, channel=Channel(prefetch_count=args.prefetch))
    async def on_registered(event: Envelope) -> None:
        await redis.set(f"{args.prefix}faststream-claim:{event.id}", "1", nx=True, px=600_000)
        marks.tick()

    await broker.start()
    results.write(json.dumps({"ready": True, "loop": loop_name()}) + "\n")
    results.flush()
    try:
        await asyncio.wait_for(marks.done.wait(), args.timeout)
    finally:
        await broker.stop()
        await redis.aclose()
    return marks.result()


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--log-file", required=True, help="where FastStream's log lines go")
    args = parser.parse_args()
    results = sys.stdout
    sys.stdout = open(args.log_file, "a", buffering=1)  # noqa: SIM115  # lives as long as we do
    result = run(consume(args, results), args.loop)
    results.write(json.dumps(result) + "\n")
    results.flush()


if __name__ == "__main__":
    main()
