"""The benchmark's cases: each measures Courier and the floor it is compared with, in turn.

A case runs its repeats interleaved (floor, Courier, floor, Courier, ...) so that a change in
the machine's load hits both sides alike, and records one value per repeat and figure in
``ctx.measurements[case][side][figure]``. Services and floors run on the service cores; wrk,
the publishers and the sinks (the outside world) on the load cores.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.harness import (
    BENCH,
    VENV_BIN,
    Backing,
    BenchError,
    Layout,
    Proc,
    RssSampler,
    Service,
    SmtpSinkProc,
    declare_courier_topology,
    preload_events,
    preload_raw,
    preload_registrations,
    py_spy_argv,
    run_wrk,
    running,
    say,
    start_service,
    start_smtp_sink,
    summarize_collapsed,
    wait_queue_empty,
)
from bench.report import percentile
from courier_testing.ports import free_port
from notification_service.routes import USER_EVENTS_QUEUE

NOTIFICATION_QUEUE = USER_EVENTS_QUEUE

FLOOR_REGISTER_QUEUE = "bench.floor.register"
FLOOR_CONSUME_QUEUE = "bench.floor.consume"
FLOOR_PACED_QUEUE = "bench.floor.paced"
#: The runner case's queues, one per subject; each is a Courier work queue bound to nothing.
RUNNER_QUEUES = {
    "raw": "bench.runner.raw",
    "courier": "bench.runner.courier",
    "faststream": "bench.runner.faststream",
}
#: The runner case's subjects (side -> script): the raw floor, Courier's runner, FastStream.
RUNNER_SUBJECTS = {
    "raw": "floors/raw_consumer.py",
    "courier": "consumers/courier_runner.py",
    "faststream": "consumers/faststream_consumer.py",
}
#: Event loops a consumer subject can run on (``--loop``); uvicorn gives Courier's services uvloop.
LOOPS = ("uvloop", "asyncio")


@dataclass(frozen=True)
class Config:
    """How much load each case gets; ``quick`` shrinks everything for a smoke run."""

    repeats: int = 3
    seconds: float = 10.0
    warmup_seconds: float = 2.0
    connections: int = 32
    consume_count: int = 6000
    prefetch: int = 100
    paced_rate: float = 1000.0
    #: A second paced rate, below what this 2-core machine sustains end to end.
    paced_low_rate: float = 100.0
    paced_seconds: float = 10.0
    paced_connections: int = 256
    slow_sender_ms: float = 2000.0
    io_sender_ms: float = 20.0
    io_prefetch: int = 2
    io_count: int = 2000
    #: Envelopes each runner-case subject consumes per repeat.
    runner_count: int = 10000
    #: How long an idle runner-case subject is sampled for its RSS (after start-up).
    runner_idle_seconds: float = 2.0
    #: Registrations per second in chain_cpu: below what the chain sustains on two cores.
    chain_rate: float = 250.0
    chain_seconds: float = 10.0
    #: The event loop of every consumer subject (raw floor, runner, FastStream).
    loop: str = "uvloop"
    drain_timeout: float = 180.0

    @classmethod
    def quick(cls, repeats: int = 3) -> Config:
        return cls(
            repeats=repeats,
            seconds=3.0,
            warmup_seconds=1.0,
            consume_count=1500,
            paced_seconds=3.0,
            io_count=600,
            runner_count=1500,
            runner_idle_seconds=1.0,
            chain_seconds=3.0,
        )


@dataclass
class Context:
    config: Config
    backing: Backing
    layout: Layout
    log_dir: Path
    profile_dir: Path | None = None
    measurements: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def record(self, case: str, side: str, **figures: float) -> None:
        sides = self.measurements.setdefault(case, {})
        metrics = sides.setdefault(side, {})
        for name, value in figures.items():
            metrics.setdefault(name, []).append(float(value))

    @property
    def service_cores(self) -> tuple[int, ...] | None:
        return self.layout.service if self.layout.pinned else None

    @property
    def load_cores(self) -> tuple[int, ...] | None:
        return self.layout.load if self.layout.pinned else None

    def token(self) -> str:
        return secrets.token_hex(4)


def _python(script: str, *args: str) -> list[str]:
    return [str(VENV_BIN / "python"), str(BENCH / script), *args]


def _profile(ctx: Context, proc: Proc, name: str, seconds: float) -> Proc | None:
    """Attach py-spy to *proc* for *seconds* (on the load cores); None unless profiling."""
    if ctx.profile_dir is None:
        return None
    ctx.profile_dir.mkdir(parents=True, exist_ok=True)
    raw = ctx.log_dir / f"{name}.collapsed"
    argv = [
        *py_spy_argv(),
        "record",
        "--pid",
        str(proc.pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        "250",
        "--format",
        "raw",
        "--output",
        str(raw),
        "--nonblocking",
    ]
    return Proc(f"py-spy-{name}", argv, ctx.log_dir / f"py-spy-{name}.log", cores=ctx.load_cores)


def _finish_profile(ctx: Context, spy: Proc | None, name: str) -> None:
    if spy is None or ctx.profile_dir is None:
        return
    assert spy.popen is not None
    spy.popen.wait(120)
    raw = ctx.log_dir / f"{name}.collapsed"
    if not raw.exists():
        ctx.notes.append(f"py-spy wrote no profile for {name}: {spy.logs(500)}")
        return
    (ctx.profile_dir / f"{name}.txt").write_text(summarize_collapsed(raw))
    say(f"profile summary: {ctx.profile_dir / f'{name}.txt'}")


# --------------------------------------------------------------------------------------------
# register: POST /v1/users vs FastAPI + HSET + confirmed publish
# --------------------------------------------------------------------------------------------


def case_register(ctx: Context) -> None:
    cfg = ctx.config
    redis = ctx.backing.redis()
    floor_port = free_port()
    floor = Proc(
        "floor-register",
        _python(
            "floors/register_app.py",
            f"--amqp-url={ctx.backing.amqp_url}",
            f"--redis-url={ctx.backing.redis_url}",
            f"--prefix={ctx.backing.prefix}",
            f"--port={floor_port}",
        ),
        ctx.log_dir / "floor-register.log",
        cores=ctx.service_cores,
    )
    floor_url = f"http://127.0.0.1:{floor_port}"
    users: Service | None = None
    with running(floor):
        floor.start().wait_http(f"{floor_url}/readyz")
        # notification-service's work queue, as it declares it at start: user-service declares
        # only the platform, and its events must have a queue to go to (no consumer runs here).
        declare_courier_topology(ctx.backing)
        users = start_service(
            "user-service",
            ctx.backing,
            ctx.log_dir,
            ctx.service_cores,
            extra={"COURIER_OUTBOX_BLOCK_MS": "1000"},
        )
        with running(users):
            outbox = f"{ctx.backing.prefix}outbox"
            for url in (floor_url, users.url):  # warm-up: imports, pools, JIT-less caches
                run_wrk(
                    url,
                    cores=ctx.load_cores,
                    connections=cfg.connections,
                    seconds=cfg.warmup_seconds,
                    token=ctx.token(),
                )
            _wait_drained(redis, outbox, cfg.drain_timeout)
            for repeat in range(cfg.repeats):
                ctx.backing.purge(FLOOR_REGISTER_QUEUE)
                ctx.backing.purge(NOTIFICATION_QUEUE)
                cpu_before = floor.cpu_seconds()
                with RssSampler([floor]) as rss:
                    result = run_wrk(
                        floor_url,
                        cores=ctx.load_cores,
                        connections=cfg.connections,
                        seconds=cfg.seconds,
                        token=ctx.token(),
                    )
                cpu = floor.cpu_seconds() - cpu_before
                ctx.record(
                    "register",
                    "floor",
                    rps=result.rps,
                    cpu_ms_per_req=1000 * cpu / max(result.requests, 1),
                    p50_ms=result.p50_ms,
                    p99_ms=result.p99_ms,
                    errors=result.errors,
                    rss_mb=rss.peak[floor.name],
                )
                say(f"register floor #{repeat + 1}: {result.rps:.0f} req/s p99 {result.p99_ms:.1f}")
                _register_courier(ctx, users, redis, outbox, profile=False)
            if ctx.profile_dir is not None:
                _register_courier(ctx, users, redis, outbox, profile=True)
    redis.close()


def _wait_drained(redis: Any, outbox: str, timeout: float) -> float:
    """Seconds until the outbox stream is empty."""
    started = time.monotonic()
    while redis.xlen(outbox) > 0:
        if time.monotonic() - started > timeout:
            raise BenchError(f"the outbox did not drain within {timeout:g}s")
        time.sleep(0.05)
    return time.monotonic() - started


def _register_courier(
    ctx: Context, users: Service, redis: Any, outbox: str, *, profile: bool
) -> None:
    cfg = ctx.config
    published_before = users.metric("courier_outbox_relayed_total", outcome="published")
    cpu_before = users.proc.cpu_seconds()
    backlog: list[int] = []
    spy = _profile(ctx, users.proc, "user-service-register", cfg.seconds) if profile else None
    with RssSampler([users.proc]) as rss:
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                backlog.append(int(redis.xlen(outbox)))
                stop.wait(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        if spy is not None:
            spy.start()
        started = time.monotonic()
        result = run_wrk(
            users.url,
            cores=ctx.load_cores,
            connections=cfg.connections,
            seconds=cfg.seconds,
            token=ctx.token(),
        )
        load_seconds = time.monotonic() - started
        published_at_end = users.metric("courier_outbox_relayed_total", outcome="published")
        backlog_end = int(redis.xlen(outbox))
        stop.set()
        sampler.join()
    drain = _wait_drained(redis, outbox, cfg.drain_timeout)
    # Up to the drained outbox: relaying is part of what a registration costs.
    cpu = users.proc.cpu_seconds() - cpu_before
    _finish_profile(ctx, spy, "user-service-register")
    if profile:
        return
    relayed = published_at_end - published_before
    # Bounded: what is left in the outbox when the load stops is under one second of load.
    bounded = backlog_end <= max(result.rps, 1.0)
    ctx.record(
        "register",
        "courier",
        rps=result.rps,
        cpu_ms_per_req=1000 * cpu / max(result.requests, 1),
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        errors=result.errors,
        relay_rps=relayed / load_seconds,
        backlog_max=max(backlog, default=0),
        backlog_end=backlog_end,
        drain_s=drain,
        backlog_bounded=1.0 if bounded else 0.0,
        rss_mb=rss.peak[users.proc.name],
    )
    say(
        f"register courier: {result.rps:.0f} req/s p99 {result.p99_ms:.1f} ms, relay "
        f"{relayed / load_seconds:.0f}/s, backlog max {max(backlog, default=0)} end {backlog_end}"
    )


# --------------------------------------------------------------------------------------------
# consume: one notification-service worker vs raw aio-pika + SET NX + ack
# --------------------------------------------------------------------------------------------


def case_consume(ctx: Context) -> None:
    cfg = ctx.config
    sink = start_smtp_sink(ctx.log_dir, ctx.load_cores)
    with running(sink):
        for repeat in range(cfg.repeats + (1 if ctx.profile_dir else 0)):
            profiling = repeat == cfg.repeats
            if not profiling:
                preload_raw(ctx.backing, FLOOR_CONSUME_QUEUE, cfg.consume_count)
                raw = _raw_consumer(ctx, FLOOR_CONSUME_QUEUE, cfg.consume_count, cfg.prefetch)
                with running(raw), RssSampler([raw]) as rss:
                    result = raw.read_json_line(cfg.drain_timeout)
                ctx.record(
                    "consume",
                    "floor",
                    msg_per_s=result["msg_per_s"],
                    cpu_ms_per_msg=result["cpu_ms_per_msg"],
                    rss_mb=rss.peak[raw.name],
                )
                say(
                    f"consume floor #{repeat + 1}: {result['msg_per_s']:.0f} msg/s, "
                    f"{result['cpu_ms_per_msg']:.2f} CPU ms/msg"
                )
            preload_registrations(ctx.backing, cfg.consume_count, ctx.token())
            rate, cpu_ms, peak, cpu_pct, sink_pct = _drain_with_workers(
                ctx, sink, cfg.consume_count, workers=1, prefetch=cfg.prefetch, profile=profiling
            )
            if not profiling:
                ctx.record(
                    "consume",
                    "courier",
                    msg_per_s=rate,
                    cpu_ms_per_msg=cpu_ms,
                    rss_mb=peak,
                    cpu_pct=cpu_pct,
                    sink_cpu_pct=sink_pct,
                )
                say(
                    f"consume courier #{repeat + 1}: {rate:.0f} msg/s, {cpu_ms:.2f} CPU ms/msg, "
                    f"worker {cpu_pct:.0f}% / sink {sink_pct:.0f}% of a core"
                )


def _raw_consumer(ctx: Context, queue: str, count: int, prefetch: int, *flags: str) -> Proc:
    raw = Proc(
        "floor-consumer",
        _python(
            "floors/raw_consumer.py",
            f"--amqp-url={ctx.backing.amqp_url}",
            f"--redis-url={ctx.backing.redis_url}",
            f"--prefix={ctx.backing.prefix}",
            f"--queue={queue}",
            f"--count={count}",
            f"--prefetch={prefetch}",
            f"--loop={ctx.config.loop}",
            *flags,
        ),
        ctx.log_dir / "floor-consumer.log",
        cores=ctx.service_cores,
        pipe_stdout=True,
    ).start()
    _await_ready(ctx, raw)
    return raw


def _await_ready(ctx: Context, proc: Proc) -> None:
    """The subject's first line: ready, on the event loop the run asked for."""
    ready = proc.read_json_line(60)
    if not ready.get("ready"):
        raise proc.fail(f"unexpected first line {ready}")
    if ready.get("loop") != ctx.config.loop:
        raise proc.fail(f"runs on {ready.get('loop')!r}, not the {ctx.config.loop!r} asked for")
    note = loop_note(ctx.config.loop)
    if note not in ctx.notes:
        ctx.notes.append(note)


def loop_note(loop: str) -> str:
    """The report's word on the consumers' event loop (the same for every subject)."""
    if loop == "uvloop":
        return (
            f"Event loop: every consumer subject (the raw floor in every case, Courier's runner, "
            f"FastStream) ran on uvloop {_version('uvloop')}, the loop uvicorn gives Courier's "
            "services; the raw floor ran on asyncio's own loop before the runner case came."
        )
    return (
        f"Event loop: every consumer subject ran on asyncio's own loop (`--loop {loop}`), "
        "while Courier's services run on uvloop under uvicorn: not the comparison to quote."
    )


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "(not installed)"


def _drain_with_workers(
    ctx: Context,
    sink: SmtpSinkProc,
    count: int,
    *,
    workers: int,
    prefetch: int,
    profile: bool = False,
) -> tuple[float, float, float, float, float]:
    """Start *workers* notification-services on a preloaded queue.

    Returns (messages/s, CPU ms per message of all workers together, peak RSS MiB, the
    workers' and the sink's CPU use in % of one core): a sink near 100% means the sink, not
    Courier, set the pace.

    Timed by the sink between the 10% and the 90% mark of *count*, so start-up (and with two
    workers, one starting a little before the other) and the tail are not counted; the floor
    is timed the same way.
    """
    sink.clear()
    services = [
        start_service(
            "notification-service",
            ctx.backing,
            ctx.log_dir,
            ctx.service_cores,
            name=f"notification-service-{index + 1}",
            extra={
                "COURIER_SMTP_PORT": str(sink.port),
                "COURIER_AMQP_PREFETCH": str(prefetch),
                "COURIER_BACKLOG_POLL_SECONDS": "5",
            },
            wait=False,
        )
        for index in range(workers)
    ]
    with running(*services):
        for service in services:
            service.wait_ready()
        spy = None
        if profile:
            spy = _profile(ctx, services[0].proc, "notification-service-consume", 8)
            assert spy is not None
            spy.start()
        with RssSampler([s.proc for s in services]) as rss:
            low_mark, high_mark = max(1, count // 10), count - count // 10
            low_time, low_count = sink.wait_count(low_mark, ctx.config.drain_timeout, poll=0.02)
            low_cpu = sum(s.proc.cpu_seconds() for s in services)
            low_sink = sink.proc.cpu_seconds()
            high_time, high_count = sink.wait_count(high_mark, ctx.config.drain_timeout, poll=0.02)
            high_cpu = sum(s.proc.cpu_seconds() for s in services)
            high_sink = sink.proc.cpu_seconds()
            sink.wait_count(count, ctx.config.drain_timeout)
        _finish_profile(ctx, spy, "notification-service-consume")
    seconds = max(high_time - low_time, 1e-6)
    sent = max(high_count - low_count, 1)
    return (
        sent / seconds,
        1000 * (high_cpu - low_cpu) / sent,
        max(rss.peak.values()),
        100 * (high_cpu - low_cpu) / seconds,
        100 * (high_sink - low_sink) / seconds,
    )


# --------------------------------------------------------------------------------------------
# paced: registration -> sent at 1,000/s vs publish -> ack at 1,000/s
# --------------------------------------------------------------------------------------------


def case_paced(ctx: Context) -> None:
    """Registration → sent at the issue's 1,000/s, and at a rate this machine sustains.

    On two shared cores 1,000 registrations/s is more than user-service, the relay, the worker
    and the broker together keep up with, so that figure measures a queue building up. The
    second rate (``paced_low_rate``) shows the latency of a system that is not saturated;
    each rate has its own floor, paced the same.
    """
    cfg = ctx.config
    sink = start_smtp_sink(ctx.log_dir, ctx.load_cores)
    with running(sink):
        notifier = start_service(
            "notification-service",
            ctx.backing,
            ctx.log_dir,
            ctx.service_cores,
            extra={"COURIER_SMTP_PORT": str(sink.port), "COURIER_BACKLOG_POLL_SECONDS": "5"},
        )
        users = start_service("user-service", ctx.backing, ctx.log_dir, ctx.service_cores)
        with running(notifier, users):
            for rate, suffix in ((cfg.paced_rate, ""), (cfg.paced_low_rate, "_low")):
                for repeat in range(cfg.repeats):
                    _paced_floor(ctx, rate, "floor" + suffix, repeat)
                    _paced_courier(ctx, users, sink, rate, "courier" + suffix, repeat)


def _paced_floor(ctx: Context, rate: float, side: str, repeat: int) -> None:
    cfg = ctx.config
    count = round(rate * cfg.paced_seconds)
    raw = _raw_consumer(ctx, FLOOR_PACED_QUEUE, count, cfg.prefetch, "--latency", "--timeout=300")
    with running(raw):
        publisher = Proc(
            "paced-publisher",
            _python(
                "floors/paced_publisher.py",
                f"--amqp-url={ctx.backing.amqp_url}",
                f"--queue={FLOOR_PACED_QUEUE}",
                f"--rate={rate:g}",
                f"--count={count}",
            ),
            ctx.log_dir / "paced-publisher.log",
            cores=ctx.load_cores,
            pipe_stdout=True,
        ).start()
        with running(publisher):
            sent = publisher.read_json_line(cfg.paced_seconds + 120)
        result = raw.read_json_line(cfg.drain_timeout)
    ctx.record("paced", side, p50_ms=result["p50_ms"], p99_ms=result["p99_ms"], rate=sent["rate"])
    say(
        f"paced {side} #{repeat + 1}: p50 {result['p50_ms']:.1f} ms p99 "
        f"{result['p99_ms']:.1f} ms at {sent['rate']:.0f}/s"
    )


def _paced_courier(
    ctx: Context, users: Service, sink: SmtpSinkProc, rate: float, side: str, repeat: int
) -> None:
    cfg = ctx.config
    sink.clear()
    result = run_wrk(
        users.url,
        cores=ctx.load_cores,
        connections=cfg.paced_connections,
        seconds=cfg.paced_seconds,
        token=ctx.token(),
        rate=rate,
    )
    achieved = result.requests / result.seconds
    if achieved < 0.9 * rate:
        note = (
            f"paced: user-service answered {achieved:.0f} of the {rate:g} registrations/s "
            "asked for (wrk waits for each answer on its connections), so the Courier side "
            "ran slower than the floor's pace"
        )
        if note not in ctx.notes:
            ctx.notes.append(note)
    # wrk counts answered requests; those answered 201 each owe the sink one welcome.
    accepted = result.requests - result.status_errors
    sink.wait_count(accepted, cfg.drain_timeout, poll=0.2)
    latencies = [ms for ms in map(_sent_latency_ms, sink.messages()) if not math.isnan(ms)]
    if not latencies:
        raise BenchError(f"paced: no welcome reached the sink ({result})")
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    ctx.record(
        "paced",
        side,
        p50_ms=p50,
        p99_ms=p99,
        rate=achieved,
        register_p99_ms=result.p99_ms,
    )
    say(f"paced {side} #{repeat + 1}: p50 {p50:.1f} ms p99 {p99:.1f} ms at {achieved:.0f}/s")
    ctx.backing.purge(NOTIFICATION_QUEUE)


def _sent_latency_ms(message: dict[str, Any]) -> float:
    """The sink's receive time minus the send time wrk wrote into the address (``p<ms>-``)."""
    rcpts = message.get("rcpt_tos") or []
    if not rcpts or not str(rcpts[0]).startswith("p"):
        return math.nan
    sent_ms = float(str(rcpts[0])[1:].split("-", 1)[0])
    received = datetime.fromisoformat(str(message["received_at"]).replace("Z", "+00:00"))
    return received.timestamp() * 1000 - sent_ms


# --------------------------------------------------------------------------------------------
# slow_sender: register p99 with an instant email sender vs a 2-second one
# --------------------------------------------------------------------------------------------


def case_slow_sender(ctx: Context) -> None:
    cfg = ctx.config
    fast = start_smtp_sink(ctx.log_dir, ctx.load_cores)
    slow = start_smtp_sink(ctx.log_dir, ctx.load_cores, delay_ms=cfg.slow_sender_ms)
    with running(fast, slow):
        users = start_service("user-service", ctx.backing, ctx.log_dir, ctx.service_cores)
        with running(users):
            for repeat in range(cfg.repeats):
                for side, sink in (("fast", fast), ("slow", slow)):
                    notifier = start_service(
                        "notification-service",
                        ctx.backing,
                        ctx.log_dir,
                        ctx.service_cores,
                        name=f"notification-service-{side}",
                        extra={
                            "COURIER_SMTP_PORT": str(sink.port),
                            "COURIER_BACKLOG_POLL_SECONDS": "5",
                            "COURIER_DRAIN_TIMEOUT_SECONDS": "5",
                        },
                    )
                    with running(notifier):
                        result = run_wrk(
                            users.url,
                            cores=ctx.load_cores,
                            connections=cfg.connections,
                            seconds=cfg.seconds,
                            token=ctx.token(),
                        )
                        sent = sink.count()
                    ctx.backing.purge(NOTIFICATION_QUEUE)
                    sink.clear()
                    ctx.record(
                        "slow_sender",
                        side,
                        rps=result.rps,
                        p50_ms=result.p50_ms,
                        p99_ms=result.p99_ms,
                        sent=sent,
                    )
                    say(
                        f"slow_sender {side} #{repeat + 1}: register {result.rps:.0f} req/s p99 "
                        f"{result.p99_ms:.1f} ms, {sent} sent meanwhile"
                    )


# --------------------------------------------------------------------------------------------
# io_workers: a 20 ms sender with one worker and with two
# --------------------------------------------------------------------------------------------


def case_io_workers(ctx: Context) -> None:
    cfg = ctx.config
    sink = start_smtp_sink(ctx.log_dir, ctx.load_cores, delay_ms=cfg.io_sender_ms)
    with running(sink):
        for repeat in range(cfg.repeats):
            for side, workers in (("one", 1), ("two", 2)):
                preload_registrations(ctx.backing, cfg.io_count, ctx.token())
                rate, cpu_ms, _, cpu_pct, sink_pct = _drain_with_workers(
                    ctx, sink, cfg.io_count, workers=workers, prefetch=cfg.io_prefetch
                )
                ctx.record(
                    "io_workers",
                    side,
                    msg_per_s=rate,
                    cpu_ms_per_msg=cpu_ms,
                    cpu_pct=cpu_pct,
                    sink_cpu_pct=sink_pct,
                )
                say(f"io_workers {side} #{repeat + 1}: {rate:.0f} msg/s")


# --------------------------------------------------------------------------------------------
# runner: courier_common's runner with a no-op handler vs the raw floor vs FastStream
# --------------------------------------------------------------------------------------------


def case_runner(ctx: Context) -> None:
    """One consumer framework's own cost: the same queue, prefetch and envelopes for all three.

    Each subject consumes ``runner_count`` ``user.registered`` envelopes preloaded into a
    Courier work queue of its own (quorum, delivery limit, dead-lettering; bound to nothing):
    the raw floor (aio-pika, ``SET NX`` and ack; it opens the queue passively), Courier's runner
    with a handler that does nothing and production defaults (idempotency claim and done,
    metrics, a JSON log line per outcome, the tracing SDK with an exporter that drops spans),
    and FastStream (a typed pydantic handler doing the same ``SET NX``, its per-message log
    lines at DEBUG). Throughput and CPU per message between the 10% and 90% marks, as the
    consume case; idle RSS from a start of the same subject on the empty queue, sampled for
    ``runner_idle_seconds`` after it said ready. The order of the three rotates per repeat.
    """
    cfg = ctx.config
    for queue in RUNNER_QUEUES.values():
        ctx.backing.purge(queue)
        preload_events(ctx.backing, queue, 0, ctx.token())  # declares it, empty
    sides = tuple(RUNNER_QUEUES)
    for repeat in range(cfg.repeats):
        shift = repeat % len(sides)
        for side in sides[shift:] + sides[:shift]:
            idle = _runner_idle_rss(ctx, side)
            result, peak = _runner_consume(ctx, side, cfg.runner_count)
            ctx.record(
                "runner",
                side,
                msg_per_s=result["msg_per_s"],
                cpu_ms_per_msg=result["cpu_ms_per_msg"],
                idle_rss_mb=idle,
                rss_mb=peak,
            )
            say(
                f"runner {side} #{repeat + 1}: {result['msg_per_s']:.0f} msg/s, "
                f"{result['cpu_ms_per_msg']:.3f} CPU ms/msg, idle RSS {idle:.1f} MiB"
            )
    ctx.notes.append(
        f"runner: FastStream {_version('faststream')} (aio-pika {_version('aio-pika')}); each "
        f"subject consumed {cfg.runner_count} preloaded envelopes per repeat from a Courier work "
        "queue, prefetch "
        f"{cfg.prefetch}; idle RSS is a separate start on the empty queue, sampled for "
        f"{cfg.runner_idle_seconds:g} s after it said ready."
    )
    if ctx.profile_dir is not None:
        for side in ("courier", "faststream"):
            rates = ctx.measurements["runner"][side]["msg_per_s"]
            seconds = 0.8 * cfg.runner_count / max(sorted(rates)[len(rates) // 2], 1.0)
            _runner_consume(ctx, side, cfg.runner_count, profile_seconds=seconds)


def _runner_subject(ctx: Context, side: str, count: int, *, timeout: float) -> Proc:
    """Start one runner-case subject on its queue; returns once it said ready."""
    args = [
        f"--amqp-url={ctx.backing.amqp_url}",
        f"--redis-url={ctx.backing.redis_url}",
        f"--prefix={ctx.backing.prefix}",
        f"--queue={RUNNER_QUEUES[side]}",
        f"--count={count}",
        f"--prefetch={ctx.config.prefetch}",
        f"--loop={ctx.config.loop}",
        f"--timeout={timeout:g}",
    ]
    if side == "raw":
        args.append("--passive")
    else:
        args.append(f"--log-file={ctx.log_dir / f'runner-{side}.jsonl'}")
    proc = Proc(
        f"runner-{side}",
        _python(RUNNER_SUBJECTS[side], *args),
        ctx.log_dir / f"runner-{side}.log",
        cores=ctx.service_cores,
        pipe_stdout=True,
    ).start()
    try:
        _await_ready(ctx, proc)
    except BaseException:
        proc.stop()
        raise
    return proc


def _runner_idle_rss(ctx: Context, side: str) -> float:
    """Peak RSS (MiB) of the subject started on its empty queue, waiting for messages."""
    ctx.backing.purge(RUNNER_QUEUES[side])
    proc = _runner_subject(ctx, side, 1_000_000_000, timeout=ctx.config.drain_timeout)
    with running(proc):
        with RssSampler([proc], interval=0.1) as rss:
            time.sleep(ctx.config.runner_idle_seconds)
        if not proc.alive():
            raise proc.fail("exited while idle")
    return rss.peak[proc.name]


def _runner_consume(
    ctx: Context, side: str, count: int, *, profile_seconds: float | None = None
) -> tuple[dict[str, Any], float]:
    """Preload *count* envelopes, let the subject consume them: (its result line, peak RSS)."""
    cfg = ctx.config
    queue = RUNNER_QUEUES[side]
    ctx.backing.purge(queue)
    preload_events(ctx.backing, queue, count, ctx.token())
    proc = _runner_subject(ctx, side, count, timeout=cfg.drain_timeout)
    name = f"runner-{side}"
    spy = None
    if profile_seconds is not None:
        spy = _profile(ctx, proc, name, profile_seconds)
    with running(proc), RssSampler([proc]) as rss:
        if spy is not None:
            spy.start()  # not stopped early: _finish_profile waits for its own end
        result = proc.read_json_line(cfg.drain_timeout)
    _finish_profile(ctx, spy, name)
    return result, rss.peak[proc.name]


# --------------------------------------------------------------------------------------------
# chain_cpu: CPU per registration of user-service + notification-service vs the floors
# --------------------------------------------------------------------------------------------


def case_chain_cpu(ctx: Context) -> None:
    """CPU seconds the whole chain spends per registration, at a rate it sustains.

    Courier: user-service (the request and its relay) and notification-service (the welcome,
    to the instant SMTP sink, lean), both with production defaults; wrk paced at
    ``chain_rate`` for ``chain_seconds``; CPU of both processes from just before the load
    until every welcome reached the sink and the outbox drained, divided by the registrations.
    Floor: the register floor app and the raw floor consuming what it publishes, running
    together and paced the same, CPU until the floor's queue is empty. Repeats interleaved.
    """
    cfg = ctx.config
    redis = ctx.backing.redis()
    outbox = f"{ctx.backing.prefix}outbox"
    sink = start_smtp_sink(ctx.log_dir, ctx.load_cores)
    floor_port = free_port()
    floor_app = Proc(
        "floor-register",
        _python(
            "floors/register_app.py",
            f"--amqp-url={ctx.backing.amqp_url}",
            f"--redis-url={ctx.backing.redis_url}",
            f"--prefix={ctx.backing.prefix}",
            f"--port={floor_port}",
        ),
        ctx.log_dir / "floor-register.log",
        cores=ctx.service_cores,
    )
    floor_url = f"http://127.0.0.1:{floor_port}"
    with running(sink, floor_app):
        floor_app.start().wait_http(f"{floor_url}/readyz")
        ctx.backing.purge(FLOOR_REGISTER_QUEUE)
        # The floor's worker: the raw floor on the queue the floor app publishes to; it runs
        # until stopped (a count it never reaches).
        floor_consumer = _raw_consumer(
            ctx, FLOOR_REGISTER_QUEUE, 1_000_000_000, cfg.prefetch, "--timeout=86400"
        )
        notifier = start_service(
            "notification-service",
            ctx.backing,
            ctx.log_dir,
            ctx.service_cores,
            extra={"COURIER_SMTP_PORT": str(sink.port)},
        )
        users = start_service("user-service", ctx.backing, ctx.log_dir, ctx.service_cores)
        with running(floor_consumer, notifier, users):
            floor = (floor_app, floor_consumer)
            chain = (users, notifier)
            # Warm-up, unmeasured: imports, pools, connections, the first batches.
            _chain_floor(ctx, floor_url, floor, seconds=cfg.warmup_seconds)
            _chain_courier(ctx, chain, sink, redis, outbox, seconds=cfg.warmup_seconds)
            for repeat in range(cfg.repeats):
                figures = _chain_floor(ctx, floor_url, floor, seconds=cfg.chain_seconds)
                ctx.record("chain_cpu", "floor", **figures)
                say(
                    f"chain_cpu floor #{repeat + 1}: {figures['cpu_ms_per_reg']:.3f} CPU ms per "
                    f"registration at {figures['rate']:.0f}/s"
                )
                figures = _chain_courier(ctx, chain, sink, redis, outbox, seconds=cfg.chain_seconds)
                ctx.record("chain_cpu", "courier", **figures)
                say(
                    f"chain_cpu courier #{repeat + 1}: {figures['cpu_ms_per_reg']:.3f} CPU ms per "
                    f"registration at {figures['rate']:.0f}/s (user-service "
                    f"{figures['users_share_pct']:.0f}%), drained {figures['drain_s']:.1f} s "
                    "after the load"
                )
    redis.close()
    ctx.notes.append(
        f"chain_cpu: wrk paced at {cfg.chain_rate:g} registrations/s for {cfg.chain_seconds:g} s "
        f"({cfg.connections} connections) on both chains; CPU per registration counts every "
        "CPU second of the chain's processes from the start of the load until the last "
        "welcome reached the sink and the outbox was empty (the floor: until its queue was "
        "empty), divided by the registrations answered 201."
    )


def _chain_floor(
    ctx: Context, url: str, procs: Sequence[Proc], *, seconds: float
) -> dict[str, float]:
    cfg = ctx.config
    app, consumer = procs
    app_before, consumer_before = app.cpu_seconds(), consumer.cpu_seconds()
    result = run_wrk(
        url,
        cores=ctx.load_cores,
        connections=cfg.connections,
        seconds=seconds,
        token=ctx.token(),
        rate=cfg.chain_rate,
    )
    # Every 201 was confirmed by the broker before it was answered: it is in the queue.
    drain = wait_queue_empty(ctx.backing, FLOOR_REGISTER_QUEUE, cfg.drain_timeout)
    time.sleep(0.25)  # at most a prefetch of deliveries still in hand: a few ms of work
    registrations = max(result.requests - result.status_errors, 1)
    register_ms = 1000 * (app.cpu_seconds() - app_before) / registrations
    consume_ms = 1000 * (consumer.cpu_seconds() - consumer_before) / registrations
    return {
        "cpu_ms_per_reg": register_ms + consume_ms,
        "register_cpu_ms_per_req": register_ms,
        "consume_cpu_ms_per_msg": consume_ms,
        "rate": result.requests / result.seconds,
        "registrations": float(registrations),
        "errors": float(result.errors),
        "drain_s": drain,
    }


def _chain_courier(
    ctx: Context,
    services: Sequence[Service],
    sink: SmtpSinkProc,
    redis: Any,
    outbox: str,
    *,
    seconds: float,
) -> dict[str, float]:
    cfg = ctx.config
    users, notifier = services
    sink.clear()
    users_before, notifier_before = users.proc.cpu_seconds(), notifier.proc.cpu_seconds()
    result = run_wrk(
        users.url,
        cores=ctx.load_cores,
        connections=cfg.connections,
        seconds=seconds,
        token=ctx.token(),
        rate=cfg.chain_rate,
    )
    load_end = time.monotonic()
    accepted = result.requests - result.status_errors
    sink.wait_count(accepted, cfg.drain_timeout, poll=0.05)
    _wait_drained(redis, outbox, cfg.drain_timeout)
    # wrk does not count the requests still in flight when its time is up, but user-service
    # answers them: their welcomes come a little later. Done when the count stops moving.
    sent = _wait_settled(sink)
    drain = time.monotonic() - load_end
    users_cpu = users.proc.cpu_seconds() - users_before
    notifier_cpu = notifier.proc.cpu_seconds() - notifier_before
    registrations = max(accepted, sent, 1)
    total = max(users_cpu + notifier_cpu, 1e-9)
    return {
        "cpu_ms_per_reg": 1000 * (users_cpu + notifier_cpu) / registrations,
        "users_cpu_ms_per_reg": 1000 * users_cpu / registrations,
        "notifier_cpu_ms_per_reg": 1000 * notifier_cpu / registrations,
        "users_share_pct": 100 * users_cpu / total,
        "notifier_share_pct": 100 * notifier_cpu / total,
        "rate": result.requests / result.seconds,
        "registrations": float(registrations),
        "errors": float(result.errors),
        "p99_ms": result.p99_ms,
        "drain_s": drain,
    }


def _wait_settled(sink: SmtpSinkProc, quiet: float = 0.3, timeout: float = 30) -> int:
    """The sink's count once it has not moved for *quiet* seconds."""
    deadline = time.monotonic() + timeout
    count = sink.count()
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = sink.count()
        if now == count:
            break
        count = now
    return count


CASES: dict[str, Callable[[Context], None]] = {
    "register": case_register,
    "consume": case_consume,
    "paced": case_paced,
    "slow_sender": case_slow_sender,
    "io_workers": case_io_workers,
    "runner": case_runner,
    "chain_cpu": case_chain_cpu,
}
