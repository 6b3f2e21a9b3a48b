"""Floor's load: publish ``--count`` messages at ``--rate`` per second, confirms on.

Each message carries ``sent_at_us`` in its headers (epoch microseconds taken right before the
publish, an integer: a float header would lose the precision), which the raw consumer turns
into publish → ack latency. Publishes are not serialised on their confirms: each is its own
task, started on schedule, so a slow confirm does not hold back the pace. Prints one JSON
line: how many, over how long, the achieved rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import aio_pika


async def publish(args: argparse.Namespace) -> dict[str, float]:
    connection = await aio_pika.connect_robust(args.amqp_url)
    channel = await connection.channel(publisher_confirms=True)
    queue = await channel.declare_queue(
        args.queue, durable=True, arguments={"x-queue-type": "quorum"}
    )
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[object]] = []
    start = loop.time()
    interval = 1.0 / args.rate
    for i in range(args.count):
        delay = start + i * interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        message = aio_pika.Message(
            b'{"type": "user.registered"}',
            headers={"sent_at_us": time.time_ns() // 1000},
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=f"paced-{i}",
        )
        tasks.append(
            asyncio.create_task(channel.default_exchange.publish(message, routing_key=queue.name))
        )
    sent = loop.time() - start
    await asyncio.gather(*tasks)
    await connection.close()
    return {"count": float(args.count), "seconds": sent, "rate": args.count / max(sent, 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args()
    sys.stdout.write(json.dumps(asyncio.run(publish(args))) + "\n")


if __name__ == "__main__":
    main()
