"""Private, disposable RabbitMQ and Redis servers for fault tests.

The fault tests SIGKILL, SIGSTOP and restart a broker or Redis. They must never do that to the
shared services (``rabbit@localhost`` on 5672, Redis on 6379), so every test that needs a
victim gets its own server here: own data directory, own free ports, own Erlang node name and
cookie. A restart keeps the ports and the data directory, so durable queues, persistent
messages and an append-only Redis file survive a ``kill()``.

Get the fixtures (``private_rabbitmq``, ``private_redis``) by loading this module as a plugin
from a conftest (``pytest_plugins = ["courier_testing.private_services"]``) or by
importing them into a conftest::

    from courier_testing.private_services import private_rabbitmq, private_redis  # noqa: F401

or use the classes directly (they are context managers: ``__enter__`` starts, ``__exit__``
closes). When the server binaries are missing the fixtures FAIL, they never skip: a fault
test that silently does not run is a defect in CI.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final, Literal, Self, TypeVar

import pytest

if TYPE_CHECKING:
    from courier_testing.rabbitmq4 import RabbitMQ4Root

__all__ = [
    "PrivateEpmd",
    "PrivateRabbitMQ",
    "PrivateRedis",
    "PrivateServiceError",
    "private_rabbitmq",
    "private_redis",
    "sweep_orphans",
]

RABBITMQ_SBIN_DIR: Final[Path] = Path(
    os.environ.get("COURIER_RABBITMQ_SBIN_DIR", "/usr/lib/rabbitmq/bin")
)
"""Where ``rabbitmq-server`` and ``rabbitmqctl`` live (Debian package layout)."""

REDIS_SERVER: Final[str] = os.environ.get("COURIER_REDIS_SERVER", "redis-server")
"""The ``redis-server`` executable (a name looked up on PATH, or a path)."""

# Ports that belong to the shared services or to RabbitMQ's CLI tools and must never be used.
_RESERVED_PORTS: Final[frozenset[int]] = frozenset(
    {4369, 5672, 5671, 6379, 15672, 15692, 25672, *range(35672, 35683)}
)
_handed_out_ports: set[int] = set()

_AMQP_HEADER: Final[bytes] = b"AMQP\x00\x00\x09\x01"
_NODE_NAME_RE: Final[re.Pattern[str]] = re.compile(r"^[A-Za-z0-9_-]+$")
_KILL_WAIT: Final[float] = 15.0
_STOP_WAIT: Final[float] = 60.0
_LOG_TAIL_CHARS: Final[int] = 4000


class PrivateServiceError(RuntimeError):
    """A private server could not be started, stopped or queried."""


# ---------------------------------------------------------------------------------------------
# helpers: ports, /proc, probes, logs
# ---------------------------------------------------------------------------------------------


def _port_is_free(port: int) -> bool:
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _free_port() -> int:
    """A free TCP port on 127.0.0.1 that this process has not handed out before.

    Chosen below the kernel's ephemeral range when possible: a server that is killed and
    restarted on the same port must not find it taken by some client's outgoing connection in
    between, and the kernel only picks source ports from the ephemeral range.
    """
    low, _high = _ephemeral_range()
    candidates_top = min(low, 65536) - 1
    if candidates_top > 20000:
        rng = random.SystemRandom()
        for _ in range(200):
            port = rng.randint(20000, candidates_top)
            if port in _RESERVED_PORTS or port in _handed_out_ports:
                continue
            if _port_is_free(port):
                _handed_out_ports.add(port)
                return port
    for _ in range(200):  # fall back to the kernel's choice
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _RESERVED_PORTS and port not in _handed_out_ports:
            _handed_out_ports.add(port)
            return port
    raise PrivateServiceError("could not find a free TCP port")


@dataclass(frozen=True)
class _ProcInfo:
    pid: int
    comm: str
    state: str
    ppid: int
    start_time: int


def _proc_info(pid: int) -> _ProcInfo | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    open_paren, close_paren = raw.find("("), raw.rfind(")")
    fields = raw[close_paren + 2 :].split()
    # fields[0] is field 3 of proc(5) (state); starttime is field 22.
    return _ProcInfo(
        pid=pid,
        comm=raw[open_paren + 1 : close_paren],
        state=fields[0],
        ppid=int(fields[1]),
        start_time=int(fields[19]),
    )


def _all_procs() -> list[_ProcInfo]:
    procs: list[_ProcInfo] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            info = _proc_info(int(entry.name))
            if info is not None:
                procs.append(info)
    return procs


def _descendants(root_pid: int) -> list[_ProcInfo]:
    """Every live process below ``root_pid`` (children first-level first)."""
    procs = _all_procs()
    children: dict[int, list[_ProcInfo]] = {}
    for info in procs:
        children.setdefault(info.ppid, []).append(info)
    found: list[_ProcInfo] = []
    frontier = [root_pid]
    while frontier:
        pid = frontier.pop(0)
        for child in children.get(pid, []):
            found.append(child)
            frontier.append(child.pid)
    return found


def _is_alive(info: _ProcInfo) -> bool:
    """True while the very same process (not a reused pid) exists and is not a zombie."""
    current = _proc_info(info.pid)
    return (
        current is not None
        and current.start_time == info.start_time
        and current.state not in {"Z", "X"}
    )


def _signal(info: _ProcInfo, sig: signal.Signals) -> None:
    if _is_alive(info):
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.pid, sig)


def _wait_gone(infos: list[_ProcInfo], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if not any(_is_alive(info) for info in infos):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _amqp_responds(port: int, timeout: float) -> bool:
    """True when something on ``port`` answers an AMQP 0-9-1 header with Connection.Start."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(_AMQP_HEADER)
            data = b""
            deadline = time.monotonic() + timeout
            while len(data) < 7 and time.monotonic() < deadline:
                chunk = sock.recv(7 - len(data))
                if not chunk:
                    return False
                data += chunk
            # method frame (type 1) on channel 0
            return len(data) == 7 and data[0] == 1 and data[1:3] == b"\x00\x00"
    except OSError:
        return False


def _resp_encode(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        raw = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def _redis_call(port: int, *args: str, timeout: float) -> bytes:
    """Send one command; return the reply line, or the bulk payload for a bulk reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(_resp_encode(*args))
        buf = b""
        while b"\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            buf += chunk
        line, _, rest = buf.partition(b"\r\n")
        if not line.startswith(b"$") or line == b"$-1":
            return line
        size = int(line[1:])
        while len(rest) < size + 2:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            rest += chunk
        return rest[:size]


def _tail(path: Path, chars: int = _LOG_TAIL_CHARS) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - chars))
            return fh.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


_OWNER_VAR: Final[str] = "COURIER_PRIVATE_SERVICE_OWNER"


def _owner_token(pid: int) -> str | None:
    info = _proc_info(pid)
    return None if info is None else f"{pid}:{info.start_time}"


def _clean_env() -> dict[str, str]:
    """The caller's environment without anything that would point a server at another node.

    Every process we start is tagged with ``COURIER_PRIVATE_SERVICE_OWNER=<pid>:<starttime>``
    of this (test) process, so orphans of a test run that died without cleaning up (SIGKILL,
    ``os._exit``) can be found and killed by the next run: see ``sweep_orphans``.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RABBITMQ_", "ERL_", "REDIS_")) and key != "CONF_ENV_FILE"
    }
    env["LANG"] = "C.UTF-8"
    env["LC_ALL"] = "C.UTF-8"
    env[_OWNER_VAR] = _owner_token(os.getpid()) or str(os.getpid())
    return env


_swept = False


def _sweep_orphans_once() -> None:
    global _swept
    if not _swept:
        _swept = True
        sweep_orphans()


def sweep_orphans() -> list[int]:
    """SIGKILL private servers left behind by test processes that no longer exist.

    Only processes carrying our owner tag are candidates, so the shared RabbitMQ and Redis
    (and servers of other live test processes, e.g. parallel workers) are never touched.
    Runs automatically before the first ``start()`` in a process. Returns the killed pids.
    """
    marker = f"{_OWNER_VAR}=".encode()
    orphans: list[_ProcInfo] = []
    for info in _all_procs():
        try:
            environ = Path(f"/proc/{info.pid}/environ").read_bytes()
        except OSError:
            continue
        for entry in environ.split(b"\0"):
            if entry.startswith(marker):
                owner = entry[len(marker) :].decode(errors="replace")
                owner_pid, sep, _ = owner.partition(":")
                if sep and owner_pid.isdigit() and _owner_token(int(owner_pid)) != owner:
                    orphans.append(info)
                break
    for info in orphans:
        _signal(info, signal.SIGKILL)
    _wait_gone(orphans, _KILL_WAIT)
    return [info.pid for info in orphans]


# Servers still running at interpreter exit are killed (a crashed test run must not leave
# Erlang VMs behind: they run in their own session, so nobody else would reap them).
_live_servers: set[_PrivateServer] = set()


@atexit.register
def _close_live_servers() -> None:
    for server in list(_live_servers):
        with contextlib.suppress(Exception):
            server.close()


# ---------------------------------------------------------------------------------------------
# common process handling
# ---------------------------------------------------------------------------------------------


class Lifecycle:
    """``with server:`` starts it (closing what started if that fails) and closes it after."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _PrivateServer(Lifecycle):
    """Process bookkeeping shared by both servers. ``_proc`` is the Popen'd launcher."""

    _label: str = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir: Path = workdir
        self._proc: subprocess.Popen[bytes] | None = None
        self._tree: list[_ProcInfo] = []
        self._paused = False
        self._closed = False
        self._starts = 0
        self.last_start_seconds: float | None = None
        """Seconds the last successful ``start()`` took (launch until ready)."""

    def __repr__(self) -> str:
        state = "paused" if self._paused else "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self._label} {state} in {self.workdir}>"

    # --- to be provided by subclasses ---------------------------------------------------------

    @property
    def log_file(self) -> Path:
        """stdout/stderr of the server process (appended to across restarts)."""
        return self.workdir / "server.out"

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _environment(self) -> dict[str, str]:
        return _clean_env()

    def _prepare(self) -> None:
        """Write config files; called before every start."""

    def _wait_ready(self, deadline: float) -> None:
        raise NotImplementedError

    def _main_process(self) -> _ProcInfo:
        """The process that IS the server (the one to SIGKILL / SIGSTOP)."""
        raise NotImplementedError

    def _graceful_stop(self, timeout: float) -> None:
        raise NotImplementedError

    def diagnostics(self) -> str:
        """Log tails, for error messages."""
        return f"--- {self.log_file} (tail) ---\n{_tail(self.log_file)}"

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the launched process has not exited (paused counts as running)."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 60) -> None:
        if self._closed:
            raise PrivateServiceError(f"{self._label} is closed")
        if self.running:
            raise PrivateServiceError(f"{self._label} is already running")
        self._reap()
        _sweep_orphans_once()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        with self.log_file.open("ab") as log:
            log.write(f"\n===== start #{self._starts + 1} at {time.ctime()} =====\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self._command(),
                cwd=self.workdir,
                env=self._environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._starts += 1
        self._paused = False
        _live_servers.add(self)
        try:
            self._wait_ready(deadline)
        except BaseException:
            self._kill_all()
            raise
        self.last_start_seconds = time.monotonic() - started

    def _check_alive(self, what: str) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise PrivateServiceError(
                f"{self._label} exited with code {self._proc.returncode} while {what}\n"
                + self.diagnostics()
            )

    def _snapshot_tree(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            known = {(info.pid, info.start_time) for info in self._tree}
            for info in _descendants(self._proc.pid):
                if (info.pid, info.start_time) not in known and info.comm != "epmd":
                    self._tree.append(info)

    def _own_processes(self) -> list[_ProcInfo]:
        """The launcher plus every descendant seen so far (never the shared epmd)."""
        self._snapshot_tree()
        procs = [info for info in self._tree if _is_alive(info)]
        if self._proc is not None and self._proc.poll() is None:
            launcher = _proc_info(self._proc.pid)
            if launcher is not None:
                procs.insert(0, launcher)
        return procs

    def kill(self) -> None:
        """SIGKILL the server process and wait until it (and its helpers) are gone."""
        if not self.running:
            if self._proc is not None:
                self._kill_all()  # it died by itself: still reap it and its helpers
            return
        try:
            main = self._main_process()
        except PrivateServiceError:  # the launcher is alive but the server is already gone
            self._kill_all()
            return
        self._snapshot_tree()
        os.kill(main.pid, signal.SIGKILL)
        if not _wait_gone([main], _KILL_WAIT):
            raise PrivateServiceError(f"{self._label}: pid {main.pid} survived SIGKILL")
        self._kill_all()

    def _kill_all(self) -> None:
        """SIGKILL everything we launched, wait for it, reap the launcher. Idempotent."""
        procs = self._own_processes()
        for info in procs:
            _signal(info, signal.SIGKILL)
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        self._reap()
        if not _wait_gone(procs, _KILL_WAIT):
            alive = [info.pid for info in procs if _is_alive(info)]
            raise PrivateServiceError(f"{self._label}: processes {alive} survived SIGKILL")
        self._tree = []
        self._paused = False

    def _reap(self) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(timeout=_KILL_WAIT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()
                self._proc.wait(timeout=_KILL_WAIT)

    def stop(self) -> None:
        """Graceful shutdown; falls back to SIGKILL if it does not finish in time."""
        if not self.running:
            return
        if self._paused:
            self.resume()
        self._snapshot_tree()
        try:
            self._graceful_stop(_STOP_WAIT)
        finally:
            self._kill_all()

    def pause(self) -> None:
        """SIGSTOP the server process: the port still accepts TCP but nothing answers."""
        if not self.running:
            raise PrivateServiceError(f"{self._label} is not running")
        os.kill(self._main_process().pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT the server process after ``pause()``."""
        if not self.running:
            raise PrivateServiceError(f"{self._label} is not running")
        os.kill(self._main_process().pid, signal.SIGCONT)
        self._paused = False

    def restart(self, graceful: bool = False, *, timeout: float = 60) -> None:
        """``kill()`` (or ``stop()`` if graceful), then ``start()`` on the same ports and data."""
        if graceful:
            self.stop()
        else:
            self.kill()
        self.start(timeout=timeout)

    def close(self) -> None:
        """Kill every process this object started. Files are left for post-mortems. Idempotent."""
        if self._closed:
            return
        try:
            if self._proc is not None:
                self._kill_all()
        finally:
            self._closed = True
            _live_servers.discard(self)


# ---------------------------------------------------------------------------------------------
# RabbitMQ
# ---------------------------------------------------------------------------------------------


class PrivateRabbitMQ(_PrivateServer):
    """A private RabbitMQ node in a temp dir on free ports; safe to SIGKILL and restart.

    Everything lives in ``base_dir / <name>``: the Erlang cookie (``home/``), the Mnesia and
    quorum-queue data (``mnesia/``), the logs (``log/`` and ``server.out``) and the generated
    ``rabbitmq.conf``. ``/etc/rabbitmq`` is never read: the env file, config file, advanced
    config and enabled-plugins file all point into the work dir.
    """

    _label = "private RabbitMQ"

    def __init__(
        self,
        base_dir: Path,
        *,
        name: str | None = None,
        management: bool = False,
        root: RabbitMQ4Root | None = None,
        epmd: PrivateEpmd | None = None,
        cookie: str | None = None,
    ) -> None:
        short = name if name is not None else f"courier-fault-{secrets.token_hex(4)}"
        if not _NODE_NAME_RE.match(short):
            raise ValueError(f"node name {short!r} must match {_NODE_NAME_RE.pattern}")
        super().__init__(Path(base_dir).absolute() / short)
        self.name: str = short
        self.nodename: str = f"{short}@localhost"
        self.management: bool = management
        #: A chroot with another RabbitMQ (courier_testing.rabbitmq4); None: the host's.
        self.root: RabbitMQ4Root | None = root
        #: A private epmd (its own ERL_EPMD_PORT); None: the host's epmd on 4369.
        self.epmd: PrivateEpmd | None = epmd
        #: The Erlang cookie; nodes of one cluster share it. None: Erlang makes one.
        self.cookie: str | None = cookie
        self.amqp_port: int = _free_port()
        self.dist_port: int = _free_port()
        self.management_port: int | None = _free_port() if management else None
        self.prometheus_port: int | None = _free_port() if management else None
        version = f" ({root.version})" if root is not None else ""
        self._label = f"private RabbitMQ {self.nodename}{version}"

    # --- public helpers -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def management_url(self) -> str | None:
        """``http://127.0.0.1:<port>`` of the management API (guest/guest), if enabled."""
        return None if self.management_port is None else f"http://127.0.0.1:{self.management_port}"

    @property
    def node_log(self) -> Path:
        return self.workdir / "log" / f"{self.nodename}.log"

    def is_responsive(self, timeout: float = 1.0) -> bool:
        """True when the AMQP port answers the protocol header within ``timeout`` seconds."""
        return _amqp_responds(self.amqp_port, timeout)

    def beam_pid(self) -> int:
        """PID of this node's Erlang VM (beam.smp)."""
        return self._main_process().pid

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """Run ``rabbitmqctl -n <node> <args>`` against this node; return its stdout."""
        return self._run_cli("rabbitmqctl", *args, timeout=timeout)

    def flush_metadata(self, timeout: float = 15) -> None:
        """Make the node write its dets tables (Ra's server directory and log meta) to disk.

        RabbitMQ 3.10 (Ra 2.2) keeps the registry of quorum-queue Ra servers in a dets file
        that is auto-saved only every 500 ms (the log meta every 5 s). A quorum queue declared
        just before a SIGKILL is then unknown to Ra after the restart: it never elects a
        leader and every operation on it hangs. ``kill()`` calls this first by default.
        Messages are not affected: confirmed messages are in the fsync'ed WAL already.
        """
        self.ctl("eval", "[dets:sync(T) || T <- dets:all()], ok.", timeout=timeout)

    def kill(self, *, flush: bool = True) -> None:
        """SIGKILL this node's Erlang VM (beam.smp) and wait until it is gone.

        With ``flush`` (the default) the node is first asked to sync its dets tables (see
        ``flush_metadata``; skipped when paused; if the CLI fails it waits 1 s instead, which
        outlasts the directory's auto-save; ~0.4 s in total normally). Pass
        ``flush=False`` for a completely unannounced kill.
        """
        if flush and self.running and not self._paused:
            try:
                self.flush_metadata()
            except PrivateServiceError:
                time.sleep(1.0)  # the CLI failed: outwait the 500 ms dets auto-save instead
        super().kill()

    def diagnostics(self) -> str:
        return (
            f"--- {self.log_file} (tail) ---\n{_tail(self.log_file)}\n"
            f"--- {self.node_log} (tail) ---\n{_tail(self.node_log)}"
        )

    # --- internals ------------------------------------------------------------------------------

    def _run_cli(self, tool: str, *args: str, timeout: float) -> str:
        if self.root is not None:
            cmd = self.root.ns_command(
                [f"{ROOT_SBIN}/{tool}", "-n", self.nodename, *args],
                bind=self.workdir,
                env=self._environment(),
            )
        else:
            cmd = [str(RABBITMQ_SBIN_DIR / tool), "-n", self.nodename, *args]
        try:
            done = subprocess.run(
                cmd,
                env=self._environment() if self.root is None else _clean_env(),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise PrivateServiceError(f"{' '.join(cmd)} timed out after {timeout}s") from exc
        stdout = done.stdout.decode("utf-8", "replace")
        if done.returncode != 0:
            stderr = done.stderr.decode("utf-8", "replace")
            raise PrivateServiceError(
                f"{' '.join(cmd)} exited with {done.returncode}\nstdout:\n{stdout}\n"
                f"stderr:\n{stderr}"
            )
        return stdout

    def _environment(self) -> dict[str, str]:
        env = _clean_env()
        # Inside a chroot the work dir is bind-mounted at NODE_MOUNT (see rabbitmq4.py).
        wd = Path(ROOT_NODE_MOUNT) if self.root is not None else self.workdir
        if self.root is not None:
            env = {key: env[key] for key in ("LANG", "LC_ALL", _OWNER_VAR) if key in env}
            env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
        if self.epmd is not None:
            env["ERL_EPMD_PORT"] = str(self.epmd.port)
        env.update(
            {
                # The Erlang cookie is $HOME/.erlang.cookie: server and CLI must share HOME.
                "HOME": str(wd / "home"),
                # Without this, /etc/rabbitmq/rabbitmq-env.conf (NODENAME=rabbit@localhost)
                # would be sourced and the CLI/server would target the shared node.
                "RABBITMQ_CONF_ENV_FILE": str(wd / "rabbitmq-env.conf"),
                "RABBITMQ_NODENAME": self.nodename,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.amqp_port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_CONFIG_FILE": str(wd / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(wd / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(wd / "enabled_plugins"),
                "RABBITMQ_MNESIA_BASE": str(wd / "mnesia"),
                "RABBITMQ_LOG_BASE": str(wd / "log"),
                "RABBITMQ_PID_FILE": str(wd / "rabbitmq.pid"),
                # Keep the distribution listener on loopback, like the shared node.
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
                    "-kernel inet_dist_use_interface {127,0,0,1}"
                ),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
            }
        )
        return env

    def _prepare(self) -> None:
        wd = self.workdir
        for sub in ("home", "mnesia", "log"):
            (wd / sub).mkdir(parents=True, exist_ok=True)
        (wd / "rabbitmq-env.conf").write_text("# intentionally empty: see private_services.py\n")
        if self.cookie is not None:
            cookie = wd / "home" / ".erlang.cookie"
            cookie.write_text(self.cookie)
            cookie.chmod(0o400)
        lines = [
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}",
        ]
        if self.management:
            lines += [
                f"management.tcp.port = {self.management_port}",
                "management.tcp.ip = 127.0.0.1",
                f"prometheus.tcp.port = {self.prometheus_port}",
                "prometheus.tcp.ip = 127.0.0.1",
            ]
        (wd / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        plugins = "[rabbitmq_management,rabbitmq_prometheus]." if self.management else "[]."
        (wd / "enabled_plugins").write_text(plugins + "\n")
        (wd / "rabbitmq.pid").unlink(missing_ok=True)

    def _command(self) -> list[str]:
        if self.root is not None:
            return self.root.ns_command(
                [f"{ROOT_SBIN}/rabbitmq-server"], bind=self.workdir, env=self._environment()
            )
        return [str(RABBITMQ_SBIN_DIR / "rabbitmq-server")]

    def start(self, timeout: float = 60) -> None:
        if self.epmd is not None and not self.epmd.running:
            self.epmd.start()
        super().start(timeout=timeout)

    def _beam(self) -> _ProcInfo | None:
        if self._proc is None or self._proc.poll() is not None:
            return None
        for info in _descendants(self._proc.pid):
            if info.comm == "beam.smp" and info.state not in {"Z", "X"}:
                return info
        return None

    def _main_process(self) -> _ProcInfo:
        beam = self._beam()
        if beam is None:
            raise PrivateServiceError(f"{self._label}: no beam.smp process is running")
        return beam

    def _wait_ready(self, deadline: float) -> None:
        # 1. the AMQP listener answers (the listener starts late in boot) ...
        while not _amqp_responds(self.amqp_port, timeout=1.0):
            self._check_alive("starting")
            if time.monotonic() >= deadline:
                raise PrivateServiceError(
                    f"{self._label}: AMQP port {self.amqp_port} not ready in time\n"
                    + self.diagnostics()
                )
            time.sleep(0.2)
        self._check_alive("starting")
        # 2. ... and the node itself (not some stranger on the port) says boot is complete.
        remaining = max(5.0, deadline - time.monotonic())
        try:
            self.ctl("await_startup", "--timeout", str(int(remaining)), timeout=remaining + 10)
        except PrivateServiceError as exc:
            raise PrivateServiceError(f"{exc}\n{self.diagnostics()}") from exc
        if self.management_port is not None:
            while not _port_accepts(self.management_port):
                self._check_alive("starting the management plugin")
                if time.monotonic() >= deadline:
                    raise PrivateServiceError(
                        f"{self._label}: management port not ready\n" + self.diagnostics()
                    )
                time.sleep(0.2)
        self._snapshot_tree()

    def _graceful_stop(self, timeout: float) -> None:
        assert self._proc is not None
        try:
            self.ctl("stop", timeout=timeout)
        except PrivateServiceError:
            return  # the caller falls back to SIGKILL
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=timeout)


ROOT_SBIN: Final[str] = "/usr/lib/rabbitmq/bin"
ROOT_NODE_MOUNT: Final[str] = "/courier-node"


class PrivateEpmd(_PrivateServer):
    """An Erlang port mapper of our own on a free port (``ERL_EPMD_PORT`` for our nodes).

    The host's epmd on 4369 belongs to the shared node: a private cluster, or a node of
    another Erlang release in a chroot, registers here instead and never talks to it. It runs
    in the foreground (no ``-daemon``), so ``close()`` ends it like any other server.
    """

    _label = "private epmd"

    def __init__(self, base_dir: Path) -> None:
        port = _free_port()
        super().__init__(Path(base_dir).absolute() / f"epmd-{port}")
        self.port: int = port
        self._label = f"private epmd :{port}"

    def _command(self) -> list[str]:
        return [shutil.which("epmd") or "epmd", "-address", "127.0.0.1", "-port", str(self.port)]

    def _main_process(self) -> _ProcInfo:
        info = None if self._proc is None else _proc_info(self._proc.pid)
        if info is None or not self.running:
            raise PrivateServiceError(f"{self._label} is not running")
        return info

    def _wait_ready(self, deadline: float) -> None:
        while not _port_accepts(self.port):
            self._check_alive("starting")
            if time.monotonic() >= deadline:
                raise PrivateServiceError(f"{self._label}: not ready\n" + self.diagnostics())
            time.sleep(0.05)

    def _graceful_stop(self, timeout: float) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=timeout)


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------------


class PrivateRedis(_PrivateServer):
    """A private ``redis-server`` on a free port with its data in ``base_dir / redis-<port>``.

    ``appendonly=True`` turns on the AOF (``appendfsync`` defaults to Redis' ``everysec``:
    an acknowledged write is in the page cache, so it survives SIGKILL of the server, though
    not a power cut). Without AOF nothing is persisted (``save ""``): a kill loses all data.
    """

    _label = "private Redis"

    def __init__(
        self,
        base_dir: Path,
        *,
        appendonly: bool = False,
        appendfsync: Literal["always", "everysec", "no"] = "everysec",
    ) -> None:
        port = _free_port()
        super().__init__(Path(base_dir).absolute() / f"redis-{port}")
        self.port: int = port
        self.appendonly: bool = appendonly
        self.appendfsync: str = appendfsync
        self._label = f"private Redis :{port}"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """PID of redis-server while running."""
        return self._proc.pid if self.running and self._proc is not None else None

    def is_responsive(self, timeout: float = 1.0) -> bool:
        """True when ``PING`` is answered with ``PONG`` within ``timeout`` seconds."""
        try:
            return _redis_call(self.port, "PING", timeout=timeout) == b"+PONG"
        except (OSError, ValueError):
            return False

    def _command(self) -> list[str]:
        exe = shutil.which(REDIS_SERVER) or REDIS_SERVER
        return [
            exe,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            "--daemonize",
            "no",
            "--logfile",
            "",
            # Keep argv/environ intact (the retitling overwrites them): sweep_orphans() finds
            # leftovers by the owner tag in /proc/<pid>/environ.
            "--set-proc-title",
            "no",
        ]

    def _main_process(self) -> _ProcInfo:
        info = None if self._proc is None else _proc_info(self._proc.pid)
        if info is None or not self.running:
            raise PrivateServiceError(f"{self._label} is not running")
        return info

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        while True:
            self._check_alive("starting")
            try:
                # -LOADING while the AOF is replayed; +PONG once usable.
                if _redis_call(self.port, "PING", timeout=1.0) == b"+PONG":
                    info = _redis_call(self.port, "INFO", "server", timeout=1.0)
                    if f"process_id:{self._proc.pid}\r".encode() in info:
                        return
                    self._check_alive("starting")
            except (OSError, ValueError):
                pass
            if time.monotonic() >= deadline:
                raise PrivateServiceError(
                    f"{self._label}: not ready in time\n" + self.diagnostics()
                )
            time.sleep(0.05)

    def _graceful_stop(self, timeout: float) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=timeout)

    def start(self, timeout: float = 20) -> None:
        super().start(timeout=timeout)

    def restart(self, graceful: bool = False, *, timeout: float = 20) -> None:
        super().restart(graceful, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# pytest fixtures (import them into a conftest)
# ---------------------------------------------------------------------------------------------


def _missing_rabbitmq() -> list[str]:
    missing = [
        str(RABBITMQ_SBIN_DIR / tool)
        for tool in ("rabbitmq-server", "rabbitmqctl")
        if not os.access(RABBITMQ_SBIN_DIR / tool, os.X_OK)
    ]
    if shutil.which("erl") is None:
        missing.append("erl (Erlang/OTP) on PATH")
    return missing


def _missing_redis() -> list[str]:
    return [] if shutil.which(REDIS_SERVER) else [f"{REDIS_SERVER} on PATH"]


def require(fixture: str, what: str, missing: list[str], install: str) -> None:
    """Fail *fixture* naming every missing tool: fault tests fail instead of skipping."""
    if missing:
        pytest.fail(
            f"{fixture}: cannot run {what}, missing: {', '.join(missing)} ({install}). "
            "Fault tests fail instead of skipping.",
            pytrace=False,
        )


_Server = TypeVar("_Server", bound=Lifecycle)


@contextlib.contextmanager
def started(fixture: str, server: _Server) -> Iterator[_Server]:
    """*server* started (a clear failure of *fixture* if it cannot be), closed afterwards."""
    try:
        server.start()
    except PrivateServiceError as exc:
        server.close()
        pytest.fail(f"{fixture}: could not start: {exc}", pytrace=False)
    except BaseException:
        server.close()
        raise
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def private_rabbitmq(tmp_path: Path) -> Iterator[PrivateRabbitMQ]:
    """A started private RabbitMQ node (no management plugin); closed after the test."""
    require(
        "private_rabbitmq",
        "a private RabbitMQ node",
        _missing_rabbitmq(),
        "install the rabbitmq-server package, or set COURIER_RABBITMQ_SBIN_DIR",
    )
    with started("private_rabbitmq", PrivateRabbitMQ(tmp_path / "rabbitmq")) as node:
        yield node


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A started private Redis with ``appendonly=True``; closed after the test."""
    require(
        "private_redis",
        "a private Redis",
        _missing_redis(),
        "install redis-server, or set COURIER_REDIS_SERVER",
    )
    with started("private_redis", PrivateRedis(tmp_path / "redis", appendonly=True)) as server:
        yield server
