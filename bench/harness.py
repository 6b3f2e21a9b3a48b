"""The benchmark's machinery: processes pinned to cores, the broker vhost, Redis, wrk, sinks.

Everything a case needs to start what it measures and to clean up after itself. The shared
RabbitMQ and Redis are never touched beyond one vhost and one key prefix that belong to this
run, both removed at the end (also when a case fails).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import httpx
import redis

from courier_testing.backing import BrokerAdmin, delete_prefix
from courier_testing.env import backing_env, process_env
from courier_testing.metrics import sample
from courier_testing.ports import free_port

if TYPE_CHECKING:
    from courier_common.messaging import Topology

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
VENV_BIN = Path(sys.executable).parent
MANAGEMENT_URL = os.environ.get("COURIER_BENCH_MANAGEMENT_URL", "http://127.0.0.1:15672")
AMQP_HOST = os.environ.get("COURIER_BENCH_AMQP_HOST", "127.0.0.1")
REDIS_URL = os.environ.get("COURIER_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
VHOST_PREFIX = "courier-bench-"


class BenchError(RuntimeError):
    """Something the benchmark needs is missing or misbehaved; the message says what."""


def say(message: str) -> None:
    """Progress on stderr, so stdout stays the table."""
    sys.stderr.write(f"[bench] {message}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------------------------
# Cores
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Which cores the measured processes get and which the load side gets."""

    service: tuple[int, ...]
    load: tuple[int, ...]

    @classmethod
    def detect(cls) -> Layout:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            return cls(tuple(cores), tuple(cores))
        half = len(cores) // 2
        return cls(tuple(cores[:half]), tuple(cores[half:]))

    @property
    def pinned(self) -> bool:
        return self.service != self.load

    def describe(self) -> dict[str, Any]:
        return {
            "service_cores": list(self.service),
            "load_cores": list(self.load),
            "shared": "RabbitMQ and Redis are the shared instances, not pinned (they float "
            "over every core).",
        }


def taskset(cores: Sequence[int] | None, argv: Sequence[str]) -> list[str]:
    if not cores:
        return list(argv)
    return ["taskset", "-c", ",".join(map(str, cores)), *argv]


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


@dataclass
class Proc:
    """One process the benchmark started: pinned, logged, stopped by its own id."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cores: Sequence[int] | None = None
    pipe_stdout: bool = False
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            taskset(self.cores, self.argv),
            cwd=REPO,
            env={**os.environ, **self.env},
            stdout=subprocess.PIPE if self.pipe_stdout else log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def logs(self, tail: int = 3000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-tail:]

    def fail(self, why: str) -> BenchError:
        return BenchError(f"{self.name}: {why}\n--- log tail ---\n{self.logs()}")

    def wait_http(self, url: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise self.fail(f"exited with {self.popen.returncode if self.popen else '?'}")
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise self.fail(f"not ready at {url} within {timeout:g}s")

    def read_json_line(self, timeout: float) -> dict[str, Any]:
        """The next JSON line on stdout (``pipe_stdout``), within *timeout*."""
        assert self.popen is not None
        assert self.popen.stdout is not None
        result: list[bytes] = []
        stream: IO[bytes] = self.popen.stdout
        reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not result or not result[0]:
            raise self.fail(f"no result line within {timeout:g}s")
        parsed: dict[str, Any] = json.loads(result[0])
        return parsed

    def cpu_seconds(self) -> float:
        """User + system CPU time this process has used so far (0 when it is gone)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            return 0.0
        # After "pid (comm)": state is field 3, utime field 14 and stime field 15 (1-based).
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        """Resident set size now, in MiB (0 when the process is gone)."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return 0.0
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        return int(found.group(1)) / 1024 if found else 0.0

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (a graceful stop), then SIGKILL to this process's own group if it hangs."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


class RssSampler:
    """Samples the RSS of some processes in a thread; ``peak`` per name."""

    def __init__(self, procs: Sequence[Proc], interval: float = 0.25) -> None:
        self.procs = procs
        self.interval = interval
        self.peak: dict[str, float] = {p.name: 0.0 for p in procs}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in self.procs:
                self.peak[proc.name] = max(self.peak[proc.name], proc.rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------
# wrk
# --------------------------------------------------------------------------------------------


def ensure_wrk() -> str:
    """wrk's path; installs Debian's ``wrk`` with apt when it is missing, and says so."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0 and not shutil.which("sudo"):
        raise BenchError("wrk is not installed and we are not root: `apt-get install wrk`")
    prefix = [] if os.geteuid() == 0 else ["sudo"]
    say("wrk is missing: installing Debian's wrk package with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        [*prefix, "apt-get", "install", "-y", "-q", "wrk"],
        [*prefix, "apt-get", "update", "-q"],
        [*prefix, "apt-get", "install", "-y", "-q", "wrk"],
    ):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if done.returncode == 0 and argv[-1] == "wrk" and shutil.which("wrk"):
            break
    found = shutil.which("wrk")
    if not found:
        raise BenchError("could not install wrk with apt-get; install it and run again")
    say(f"installed wrk at {found}")
    return found


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    #: Answers that were not 2xx/3xx (wrk's "status" errors); ``requests`` includes them.
    status_errors: int


def run_wrk(
    url: str,
    *,
    cores: Sequence[int] | None,
    connections: int,
    seconds: float,
    token: str,
    rate: float | None = None,
    threads: int = 1,
) -> WrkResult:
    """wrk with bench/lua/register.lua against *url*; *rate* paces it (requests/s in all)."""
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "30s",
        "-s",
        str(BENCH / "lua" / "register.lua"),
        url,
        "--",
        token,
    ]
    if rate:
        argv.append(f"{rate / threads:g}")
    done = subprocess.run(
        taskset(cores, argv), capture_output=True, text=True, timeout=seconds + 120, check=False
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH ")), None)
    if done.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    data = json.loads(line[len("BENCH ") :])
    duration = data["duration_us"] / 1e6
    errors = sum(
        data[k]
        for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    return WrkResult(
        requests=data["requests"],
        seconds=duration,
        rps=(data["requests"] - data["status_errors"]) / duration,
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        errors=errors,
        status_errors=data["status_errors"],
    )


# --------------------------------------------------------------------------------------------
# The run's broker vhost and Redis prefix
# --------------------------------------------------------------------------------------------


@dataclass
class Backing:
    """One vhost on the shared broker and one Redis key prefix, both this run's alone."""

    run_id: str = field(default_factory=lambda: f"{os.getpid()}-{secrets.token_hex(3)}")
    admin: BrokerAdmin = field(
        default_factory=lambda: BrokerAdmin(MANAGEMENT_URL, amqp_host=AMQP_HOST, amqp_port=5672)
    )

    @property
    def vhost(self) -> str:
        return f"{VHOST_PREFIX}{self.run_id}"

    @property
    def amqp_url(self) -> str:
        return self.admin.vhost(self.vhost).amqp_url

    @property
    def redis_url(self) -> str:
        return REDIS_URL

    @property
    def prefix(self) -> str:
        return f"courier-bench:{self.run_id}:"

    def open(self) -> Backing:
        try:
            self.admin.client.get("/api/overview").raise_for_status()
            redis.Redis.from_url(REDIS_URL).ping()
        except (httpx.HTTPError, redis.RedisError) as exc:
            raise BenchError(
                f"RabbitMQ (management API {MANAGEMENT_URL}) and Redis ({REDIS_URL}) must be "
                f"running: `make setup` starts them ({exc!r})"
            ) from exc
        self.admin.sweep_stale(VHOST_PREFIX)  # bench vhosts of a run that was killed
        self.admin.create_vhost(self.vhost)
        return self

    def purge(self, queue: str) -> None:
        self.admin.purge(self.vhost, queue)

    def close(self) -> None:
        self.admin.delete_vhost(self.vhost)
        client = redis.Redis.from_url(REDIS_URL)
        delete_prefix(client, self.prefix)
        client.close()
        self.admin.close()

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(REDIS_URL)


# --------------------------------------------------------------------------------------------
# Sinks
# --------------------------------------------------------------------------------------------


@dataclass
class SmtpSinkProc:
    """An SMTP sink process: instant (``courier-smtp-sink``) or delayed (the bench wrapper)."""

    proc: Proc
    port: int
    control_port: int

    @property
    def control(self) -> str:
        return f"http://127.0.0.1:{self.control_port}/_sink"

    def count(self) -> int:
        return int(httpx.get(f"{self.control}/healthz", timeout=5).json()["count"])

    def clear(self) -> None:
        httpx.delete(f"{self.control}/messages", timeout=30).raise_for_status()

    def messages(self) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.control}/messages", timeout=120)
        response.raise_for_status()
        result: list[dict[str, Any]] = response.json()
        return result

    def wait_count(self, wanted: int, timeout: float, poll: float = 0.05) -> tuple[float, int]:
        """Poll until *wanted* messages arrived; (monotonic time it happened, count)."""
        deadline = time.monotonic() + timeout
        while True:
            count = self.count()
            if count >= wanted:
                return time.monotonic(), count
            if time.monotonic() > deadline:
                raise BenchError(f"the SMTP sink got {count} of {wanted} within {timeout:g}s")
            time.sleep(poll)


def start_smtp_sink(
    log_dir: Path, cores: Sequence[int] | None, delay_ms: float = 0
) -> SmtpSinkProc:
    port, control = free_port(), free_port()
    # Lean records (no MIME parse): the full parse costs the sink about 3 ms of CPU per
    # message, more than the worker under test, and the cases read only the envelope.
    argv = [
        str(VENV_BIN / "courier-smtp-sink"),
        f"--port={port}",
        f"--control-port={control}",
        "--store=",
        "--log-level=warning",
        "--no-parse",
        f"--delay-ms={round(delay_ms)}",
    ]
    name = f"smtp-sink-{round(delay_ms)}ms" if delay_ms else "smtp-sink"
    proc = Proc(name, argv, log_dir / f"{name}.log", cores=cores).start()
    sink = SmtpSinkProc(proc, port, control)
    proc.wait_http(f"{sink.control}/healthz", timeout=30)
    return sink


# --------------------------------------------------------------------------------------------
# Courier services
# --------------------------------------------------------------------------------------------


def service_env(
    backing: Backing, port: int, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """A service's environment: this run's vhost and prefix, JSON logs, no trace export."""
    return {
        **backing_env(backing.amqp_url, backing.redis_url, backing.prefix),
        **process_env(port, environment="development"),
        "COURIER_LOG_LEVEL": "INFO",
        **(extra or {}),
    }


@dataclass
class Service:
    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        self.proc.wait_http(f"{self.url}/readyz", timeout=90)

    def metric(self, name: str, **labels: str) -> float:
        """One sample from ``/metrics`` (0 when absent)."""
        return sample(httpx.get(f"{self.url}/metrics", timeout=10).text, name, **labels)


def start_service(
    script: str,
    backing: Backing,
    log_dir: Path,
    cores: Sequence[int] | None,
    *,
    name: str | None = None,
    extra: Mapping[str, str] | None = None,
    wait: bool = True,
) -> Service:
    port = free_port()
    label = name or script
    proc = Proc(
        label,
        [str(VENV_BIN / script)],
        log_dir / f"{label}.log",
        env=service_env(backing, port, extra),
        cores=cores,
    ).start()
    service = Service(proc, port)
    if wait:
        service.wait_ready()
    return service


@contextmanager
def running(*procs: Proc | Service | SmtpSinkProc | None) -> Iterator[None]:
    """Stop these (in reverse) whatever happens inside."""
    try:
        yield
    finally:
        for item in reversed(procs):
            if item is None:
                continue
            proc = item if isinstance(item, Proc) else item.proc
            try:
                proc.stop()
            except Exception as exc:
                say(f"stopping {proc.name} failed: {exc!r}")


# --------------------------------------------------------------------------------------------
# Preloading queues
# --------------------------------------------------------------------------------------------


def _notifier_topology(backing: Backing) -> Topology:
    """The platform plus notification-service's work queue, as the service declares them."""
    from courier_common.messaging import Topology
    from notification_service.config import Settings
    from notification_service.routes import user_events_queue

    settings = Settings(amqp_url=backing.amqp_url)
    return Topology(work_queues=(user_events_queue(settings),))


def declare_courier_topology(backing: Backing) -> None:
    asyncio.run(_declare_courier_topology(backing))


async def _declare_courier_topology(backing: Backing) -> None:
    from courier_common.messaging import AmqpConnection, declare_topology

    connection = await AmqpConnection(backing.amqp_url, client_name="bench").connect()
    try:
        topology = _notifier_topology(backing)
        await declare_topology(await connection.channel(), topology)
    finally:
        await connection.close()


def preload_events(backing: Backing, queue: str, count: int, token: str) -> None:
    """*count* ``user.registered`` envelopes straight into the work queue *queue*.

    The queue is declared as a Courier work queue (quorum, retry tiers) bound to nothing: the
    runner and FastStream subjects consume it without any other consumer seeing the events.
    """
    asyncio.run(_preload_events(backing, queue, count, token))


async def _preload_events(backing: Backing, queue: str, count: int, token: str) -> None:
    from courier_common.messaging import (
        DEFAULT_EXCHANGE,
        AmqpConnection,
        OutgoingMessage,
        Publisher,
        Topology,
        WorkQueue,
        declare_topology,
    )
    from courier_testing.events import user_registered

    connection = await AmqpConnection(backing.amqp_url, client_name="bench-preload").connect()
    try:
        work = WorkQueue(name=queue, binding_keys=())
        await declare_topology(await connection.channel(), Topology(work_queues=(work,)))
        publisher = Publisher(await connection.channel())
        batch: list[OutgoingMessage] = []
        for i in range(count):
            event = user_registered(f"r-{token}-{i}@bench.example.com", display_name="Bench")
            batch.append(
                OutgoingMessage.for_event(event, exchange=DEFAULT_EXCHANGE, routing_key=queue)
            )
            if len(batch) >= 500 or i == count - 1:
                errors = [e for e in await publisher.publish_many(batch) if e is not None]
                if errors:
                    raise BenchError(f"preload failed: {errors[0]!r}")
                batch = []
    finally:
        await connection.close()


def queue_depth(backing: Backing, queue: str) -> int:
    """Messages ready in *queue* now (a passive declare; unacknowledged ones not counted)."""
    return asyncio.run(_queue_depth(backing, queue))


async def _queue_depth(backing: Backing, queue: str) -> int:
    import aio_pika

    connection = await aio_pika.connect(backing.amqp_url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        return int(count or 0)
    finally:
        await connection.close()


def wait_queue_empty(backing: Backing, queue: str, timeout: float, poll: float = 0.1) -> float:
    """Seconds until *queue* has no ready message (its consumer took them all)."""
    started = time.monotonic()
    while queue_depth(backing, queue) > 0:
        if time.monotonic() - started > timeout:
            raise BenchError(f"{queue} was not drained within {timeout:g}s")
        time.sleep(poll)
    return time.monotonic() - started


def preload_registrations(backing: Backing, count: int, token: str) -> None:
    """*count* ``user.registered`` events (email only) in notification.user-events."""
    asyncio.run(_preload_registrations(backing, count, token))


async def _preload_registrations(backing: Backing, count: int, token: str) -> None:
    from courier_common.messaging import (
        AmqpConnection,
        OutgoingMessage,
        Publisher,
        declare_topology,
    )
    from courier_testing.events import user_registered

    connection = await AmqpConnection(backing.amqp_url, client_name="bench-preload").connect()
    try:
        topology = _notifier_topology(backing)
        await declare_topology(await connection.channel(), topology)
        publisher = Publisher(await connection.channel())
        batch: list[OutgoingMessage] = []
        for i in range(count):
            event = user_registered(f"c-{token}-{i}@bench.example.com", display_name="Bench")
            batch.append(OutgoingMessage.for_event(event, exchange=topology.events_exchange))
            if len(batch) >= 500 or i == count - 1:
                errors = [e for e in await publisher.publish_many(batch) if e is not None]
                if errors:
                    raise BenchError(f"preload failed: {errors[0]!r}")
                batch = []
    finally:
        await connection.close()


def preload_raw(backing: Backing, queue: str, count: int) -> None:
    """*count* small persistent messages in a quorum queue, for the raw consumer."""
    asyncio.run(_preload_raw(backing, queue, count))


async def _preload_raw(backing: Backing, queue_name: str, count: int) -> None:
    import aio_pika

    connection = await aio_pika.connect_robust(backing.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            queue_name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        body = json.dumps({"type": "user.registered", "data": {"email": "x@bench.example.com"}})
        for start in range(0, count, 500):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(
                            body.encode(),
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            message_id=f"raw-{start + i}-{secrets.token_hex(4)}",
                        ),
                        routing_key=queue.name,
                    )
                    for i in range(min(500, count - start))
                )
            )
    finally:
        await connection.close()


# --------------------------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------------------------


def py_spy_argv() -> list[str]:
    found = shutil.which("py-spy")
    if found:
        return [found]
    uv = shutil.which("uv")
    if uv:
        return [uv, "tool", "run", "py-spy"]
    raise BenchError("--profile needs py-spy (`uv tool install py-spy`) or uv on PATH")


_LINE_NUMBER = re.compile(r":\d+\)$")
_FRAME_FILE = re.compile(r"\((?P<path>[^():]+?)(?::\d+)?\)$")
#: Frames of threads other than the event loop's (idle pool threads, exporters).
_OTHER_THREAD = "Thread._bootstrap (threading.py"


def _component(frame: str) -> str | None:
    """Which library a frame belongs to: ``courier_common/logging.py`` -> courier_common.logging."""
    found = _FRAME_FILE.search(frame)
    if not found:
        return None
    path = found["path"]
    parts = path.split("/")
    if parts[0] in {"courier_common", "user_service", "notification_service"}:
        return ".".join(parts[:2]).removesuffix(".py")
    if parts[0] in {"asyncio", "threading.py", "logging", "json", "email", "re", "contextlib.py"}:
        return "stdlib:" + parts[0].removesuffix(".py")
    if len(parts) == 1:
        return None
    return parts[0]


def summarize_collapsed(collapsed: Path, top: int = 25) -> str:
    """A small text summary of py-spy's collapsed stacks (the event-loop thread only).

    Own time and inclusive time per function, and inclusive time per library or Courier
    module: "what share of the loop's busy samples had this on the stack".
    """
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    components: dict[str, int] = {}
    total = other = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        if _OTHER_THREAD in stack:
            other += count
            continue
        total += count
        # "function (path.py:123)" -> "function (path.py)": one entry per function.
        frames = [_LINE_NUMBER.sub(")", frame) for frame in stack.split(";")]
        for frame in set(frames):
            incl_counts[frame] = incl_counts.get(frame, 0) + count
        for name in {c for c in map(_component, frames) if c}:
            components[name] = components.get(name, 0) + count
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count
    if not total:
        return "no samples\n"

    def table(counts: dict[str, int], limit: int) -> list[str]:
        ranked = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)[:limit]
        return [f"{100 * n / total:6.1f}%  {frame}" for frame, n in ranked]

    lines = [
        f"event-loop thread samples: {total} (other threads: {other}, not counted)",
        "",
        "inclusive, by library / Courier module:",
        *table(components, 30),
        "",
        f"top {top} by own time:",
        *table(self_counts, top),
        "",
        f"top {top} inclusive:",
        *table(incl_counts, top),
    ]
    return "\n".join(lines) + "\n"
