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
from collections.abc import Sequence
from pathlib import Path
from typing import IO

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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: bench.subject
from bench.subject import Marks, arguments, loop_name, run


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

    marks = Marks(args.count)

    router = Router()

    @router.handles(UserRegistered)
    async def on_registered(event: Event[UserRegistered]) -> None:
        marks.tick()

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
        await asyncio.wait_for(marks.done.wait(), args.timeout)
        await runner.stop(timeout=10)
    finally:
        await connection.close()
        await redis.aclose()
        provider.shutdown()
    return marks.result()


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--log-file", required=True, help="where the JSON log lines go")
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
