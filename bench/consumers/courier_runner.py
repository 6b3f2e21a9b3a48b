"""Subject: courier_common's runner with a handler that does nothing, production defaults on.

What a Courier consumer costs before it does any work of its own: the delivery loop, strict
envelope decoding, the idempotency claim and done mark in Redis (per event id), the metrics, one
JSON log line per outcome (to ``--log-file``, as a container's stdout would take it), and the
tracing SDK with a batch span processor whose exporter drops the spans. It consumes ``--count``
``user.registered`` events from ``--queue`` and prints the same JSON lines as
``bench/floors/raw_consumer.py`` (ready with the loop's name, then the throughput between the
10% and 90% marks). ``--loop`` as there: uvloop by default, the loop uvicorn runs Courier's
services on.

The queue is a Courier work queue (quorum, delivery limit, dead-lettering, retry tiers)
declared as ``bench.harness.preload_events`` declares it: bound to nothing, so no other case's
events reach it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import IO, Any, TypeVar

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry

from courier_common.events import UserRegistered
from courier_common.logging import configure_logging
from courier_common.messaging import (
    AmqpConnection,
    ConsumerRunner,
    Event,
    IdempotencyStore,
    Router,
    Topology,
    WorkQueue,
    declare_topology,
)
from courier_common.metrics import MessagingMetrics
from courier_common.redis import connect as redis_connect

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


class DroppingExporter(SpanExporter):
    """Takes every batch and keeps nothing: the SDK's cost without a collector's."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


async def consume(args: argparse.Namespace, results: IO[str]) -> dict[str, float]:
    provider = TracerProvider(resource=Resource.create({"service.name": "bench-runner"}))
    provider.add_span_processor(BatchSpanProcessor(DroppingExporter()))
    trace.set_tracer_provider(provider)
    redis = redis_connect(args.redis_url)
    metrics = MessagingMetrics(CollectorRegistry(), event_types=[UserRegistered.event_type])
    idempotency = IdempotencyStore(redis, prefix=args.prefix, metrics=metrics)
    connection = await AmqpConnection(args.amqp_url, client_name="bench-runner").connect()
    queue = WorkQueue(name=args.queue, binding_keys=())
    await declare_topology(await connection.channel(), Topology(work_queues=(queue,)))

    done = asyncio.Event()
    seen = 0
    low_mark, high_mark = max(1, args.count // 10), args.count - args.count // 10
    low_time = high_time = low_cpu = high_cpu = 0.0

    router = Router()

    @router.handles(UserRegistered)
    async def on_registered(event: Event[UserRegistered]) -> None:
        nonlocal seen, low_time, high_time, low_cpu, high_cpu
        seen += 1
        if seen == low_mark:
            low_time, low_cpu = time.perf_counter(), time.process_time()
        if seen == high_mark:
            high_time, high_cpu = time.perf_counter(), time.process_time()
        if seen >= args.count:
            done.set()

    runner = ConsumerRunner(
        connection=connection,
        queue=queue,
        router=router,
        metrics=metrics,
        consumer_name="bench-runner",
        prefetch=args.prefetch,
        idempotency=idempotency,
    )
    await runner.start()
    results.write(json.dumps({"ready": True, "loop": loop_name()}) + "\n")
    results.flush()
    try:
        await asyncio.wait_for(done.wait(), args.timeout)
        await runner.stop(timeout=10)
    finally:
        await connection.close()
        await redis.aclose()
        provider.shutdown()
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
    parser.add_argument("--log-file", required=True, help="where the JSON log lines go")
    parser.add_argument("--loop", choices=LOOPS, default="uvloop", help="event loop")
    args = parser.parse_args()
    results = sys.stdout
    # Courier logs to whatever sys.stdout is; the result lines keep the real one.
    sys.stdout = open(args.log_file, "a", buffering=1)  # noqa: SIM115  # lives as long as we do
    configure_logging(level="INFO", fmt="json", service="bench-runner")
    result = run(consume(args, results), args.loop)
    results.write(json.dumps(result) + "\n")
    results.flush()


if __name__ == "__main__":
    main()
