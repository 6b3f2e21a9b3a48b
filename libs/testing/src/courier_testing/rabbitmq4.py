"""RabbitMQ 4.0 for the test harness: Debian 13's broker in a chroot, built once and cached.

Debian 12 ships RabbitMQ 3.10 (Erlang 25); production runs 4.x. Debian 13 (trixie) ships
rabbitmq-server 4.0.5 on Erlang 27, so a trixie root made with ``debootstrap`` from the same
Debian mirror apt uses here runs that broker in a chroot, with nothing installed on the host.

The root is built once (about two minutes: ``debootstrap --variant=minbase trixie`` then
``apt-get install --no-install-recommends rabbitmq-server`` inside it) and cached OUTSIDE the
repository, in ``${XDG_CACHE_HOME:-~/.cache}/courier/rabbitmq4-trixie`` or wherever
``COURIER_RABBITMQ4_ROOT`` says, so every later run (and CI, which runs on this machine in a
fresh clone) reuses it. A file lock makes parallel runs wait for one build instead of
building twice; a build goes to a temporary directory renamed into place only once it is
complete and checked, so a killed build never leaves a half root that looks usable.

Nothing is mounted on the host: each chroot'ed process (the node, each CLI call, the build's
``apt-get``) runs under ``unshare --mount`` with its own ``/proc`` and ``/dev`` and the node's
work dir bind-mounted in. Those mounts belong to that process's private mount namespace and
vanish with it, so a SIGKILL'd node or a crashed test run cannot leave a mount behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
from filelock import FileLock

from courier_testing.private_services import PrivateEpmd, PrivateRabbitMQ, PrivateServiceError

__all__ = [
    "ROOT_ENV",
    "RabbitMQ4Root",
    "RootBuildError",
    "debian_mirror",
    "default_root",
    "ensure_root",
    "missing_tools",
    "rabbitmq4_node",
    "rabbitmq4_root",
    "start_rabbitmq4_node",
]

ROOT_ENV: Final[str] = "COURIER_RABBITMQ4_ROOT"
MIRROR_ENV: Final[str] = "COURIER_DEBIAN_MIRROR"
SUITE: Final[str] = "trixie"
#: Where the node's work dir is bind-mounted inside the root.
NODE_MOUNT: Final[str] = "/courier-node"
#: Written last by a build: a root without it is incomplete and is never used.
STAMP: Final[str] = ".courier-rabbitmq4-ready"
SBIN: Final[str] = "/usr/lib/rabbitmq/bin"
_BUILD_TIMEOUT: Final[float] = 1200.0
_PACKAGES: Final[tuple[str, ...]] = ("rabbitmq-server",)


class RootBuildError(RuntimeError):
    """The RabbitMQ 4 root could not be built or is unusable."""


def default_root() -> Path:
    """``$COURIER_RABBITMQ4_ROOT``, else ``$XDG_CACHE_HOME/courier/rabbitmq4-trixie``.

    (``XDG_CACHE_HOME`` defaults to ``~/.cache``.)
    """
    explicit = os.environ.get(ROOT_ENV)
    if explicit:
        return Path(explicit).expanduser().absolute()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser().absolute() / "courier" / "rabbitmq4-trixie"


def debian_mirror() -> str:
    """The Debian archive apt uses on this machine (``$COURIER_DEBIAN_MIRROR`` overrides).

    Read from ``/etc/apt/sources.list`` (one-line format) and ``/etc/apt/sources.list.d``
    (both formats): the first URI of a Debian suite that is not the security archive.
    """
    explicit = os.environ.get(MIRROR_ENV)
    if explicit:
        return explicit.rstrip("/")
    files = [Path("/etc/apt/sources.list")]
    parts = Path("/etc/apt/sources.list.d")
    if parts.is_dir():
        files += sorted(parts.iterdir())
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        uris: list[str] = []
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            one_line = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
            if one_line:
                uris.append(one_line[1])
            elif line.startswith("URIs:"):
                uris += line.split()[1:]
        for uri in uris:
            if re.search(r"/debian/?$", uri) and "security" not in uri:
                return uri.rstrip("/")
    raise RootBuildError(
        "no Debian mirror found in /etc/apt/sources.list*: set "
        f"{MIRROR_ENV} to the Debian archive URL apt uses"
    )


def missing_tools() -> list[str]:
    """Host tools the RabbitMQ 4 root needs (building and running it)."""
    needed = ("debootstrap", "chroot", "unshare", "mount", "epmd")
    missing = [tool for tool in needed if _which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root (debootstrap, chroot and mount namespaces need it)")
    return missing


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _say(message: str) -> None:
    # pytest captures stdout of fixtures; stderr of a session-scoped build shows with -s and
    # in the captured output of the first test that needed it. The result is also returned.
    print(f"rabbitmq4-root: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class RabbitMQ4Root:
    """A complete trixie root with rabbitmq-server installed, and how it came to be."""

    path: Path
    version: str
    erlang: str
    built: bool
    seconds: float

    def describe(self) -> str:
        what = f"built in {self.seconds:.0f} s" if self.built else "reused"
        return (
            f"RabbitMQ {self.version} (Erlang {self.erlang}) in the Debian {SUITE} root "
            f"{self.path} ({what})"
        )

    def ns_command(
        self, argv: list[str], *, bind: Path | None = None, env: dict[str, str] | None = None
    ) -> list[str]:
        """``argv`` run chroot'ed in this root, in a private mount namespace (see module doc).

        *bind* is bind-mounted at ``NODE_MOUNT``; *env* is the environment inside (the
        chroot'ed process gets exactly that, via ``env -i``).
        """
        return namespace_command(self.path, argv, bind=bind, env=env)


def namespace_command(
    root: Path, argv: list[str], *, bind: Path | None = None, env: dict[str, str] | None = None
) -> list[str]:
    mounts = [
        f"mount -t proc proc {_q(root / 'proc')}",
        f"mount --rbind /dev {_q(root / 'dev')}",
    ]
    if bind is not None:
        target = root / NODE_MOUNT.lstrip("/")
        mounts.append(f"mkdir -p {_q(target)} && mount --bind {_q(bind)} {_q(target)}")
    inner = ["env", "-i", *(f"{k}={v}" for k, v in (env or {}).items()), *argv]
    script = " && ".join(mounts) + " && exec chroot " + _q(root) + " " + " ".join(map(_q, inner))
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]


def _q(value: object) -> str:
    text = str(value)
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", text):
        return text
    return "'" + text.replace("'", "'\\''") + "'"


def _run(cmd: list[str], log: Path, *, timeout: float = _BUILD_TIMEOUT) -> None:
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        try:
            done = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8"},
            )
        except subprocess.TimeoutExpired as exc:
            raise RootBuildError(f"{cmd[0]} timed out after {timeout:.0f} s (log: {log})") from exc
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RootBuildError(
            f"{' '.join(cmd[:3])}... exited {done.returncode} (log: {log})\n{tail}"
        )


def _query(root: Path, package: str) -> str:
    status = (root / "var/lib/dpkg/status").read_text(errors="replace")
    for block in status.split("\n\n"):
        if re.search(rf"^Package: {re.escape(package)}$", block, re.M) and re.search(
            r"^Status: install ok installed$", block, re.M
        ):
            found = re.search(r"^Version: (\S+)$", block, re.M)
            if found:
                return found[1]
    raise RootBuildError(f"{package} is not installed in {root}")


def _check(root: Path) -> tuple[str, str]:
    for tool in ("rabbitmq-server", "rabbitmqctl", "rabbitmq-plugins"):
        if not (root / SBIN.lstrip("/") / tool).exists():
            raise RootBuildError(f"{root}: {SBIN}/{tool} is missing")
    plugins = list((root / "usr/lib/rabbitmq/lib").glob("rabbitmq_server-*/plugins"))
    if not plugins or not any(p.glob("rabbitmq_management-*") for p in plugins):
        raise RootBuildError(f"{root}: the rabbitmq_management plugin is missing")
    return _query(root, "rabbitmq-server"), _query(root, "erlang-base")


def _build(target: Path, log: Path) -> None:
    mirror = debian_mirror()
    work = target.parent / f".{target.name}.building-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        _say(f"building {target} (debootstrap --variant=minbase {SUITE} from {mirror}; log {log})")
        # In its own mount namespace too: the /proc and /sys debootstrap mounts in the target
        # go away with it even if it is killed half-way.
        debootstrap = _which("debootstrap") or "debootstrap"
        _run(
            [
                *("unshare", "--mount", "--propagation", "private", debootstrap),
                *("--variant=minbase", SUITE, str(work), mirror),
            ],
            log,
        )
        # No service may start inside the root while packages install.
        policy = work / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        (work / "etc/hosts").write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost\n")
        apt = ["/usr/bin/apt-get", "-q", "-y"]
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "DEBIAN_FRONTEND": "noninteractive",
            "LC_ALL": "C.UTF-8",
            "HOME": "/root",
        }
        _run(namespace_command(work, [*apt, "update"], env=env), log)
        _run(
            namespace_command(
                work, [*apt, "install", "--no-install-recommends", *_PACKAGES], env=env
            ),
            log,
        )
        _run(namespace_command(work, [*apt, "clean"], env=env), log)
        version, erlang = _check(work)
        (work / STAMP).write_text(f"rabbitmq-server {version}\nerlang-base {erlang}\n")
        if target.exists():  # a stale, incomplete root (no stamp): replace it
            shutil.rmtree(target)
        work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_root(path: Path | None = None) -> RabbitMQ4Root:
    """The cached root, built first when it is missing or incomplete (under a file lock)."""
    target = (path or default_root()).absolute()
    missing = missing_tools()
    if missing:
        raise RootBuildError(
            "cannot build or run the RabbitMQ 4 root, missing: " + ", ".join(missing)
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    log = target.parent / f"{target.name}.build.log"
    waited = time.monotonic()
    with FileLock(str(target.parent / f"{target.name}.lock"), timeout=_BUILD_TIMEOUT):
        if (target / STAMP).exists():
            version, erlang = _check(target)
            root = RabbitMQ4Root(target, version, erlang, built=False, seconds=0.0)
            if time.monotonic() - waited > 5:
                _say(f"waited {time.monotonic() - waited:.0f} s for another run's build")
            _say(root.describe())
            return root
        started = time.monotonic()
        with contextlib.suppress(FileNotFoundError):
            log.unlink()
        _build(target, log)
        version, erlang = _check(target)
        root = RabbitMQ4Root(
            target, version, erlang, built=True, seconds=time.monotonic() - started
        )
        _say(root.describe())
        return root


if __name__ == "__main__":  # python -m courier_testing.rabbitmq4: build (or find) the root
    print(ensure_root().describe())


# --- pytest fixtures (loaded as a plugin by the root conftest) -----------------------------------

_used: list[RabbitMQ4Root] = []


@pytest.fixture(scope="session")
def rabbitmq4_root() -> RabbitMQ4Root:
    """The RabbitMQ 4 root, built on first use. Missing tools FAIL the test, never skip it."""
    try:
        root = ensure_root()
    except (RootBuildError, OSError) as exc:
        pytest.fail(f"rabbitmq4_root: {exc}", pytrace=False)
    _used.append(root)
    return root


def start_rabbitmq4_node(
    root: RabbitMQ4Root, base_dir: Path
) -> tuple[PrivateRabbitMQ, PrivateEpmd]:
    """A started RabbitMQ 4 node with management, and its private epmd (close both)."""
    epmd = PrivateEpmd(base_dir)
    node = PrivateRabbitMQ(base_dir, management=True, root=root, epmd=epmd)
    try:
        node.start(timeout=180)
    except PrivateServiceError as exc:
        node.close()
        epmd.close()
        pytest.fail(f"RabbitMQ 4 node: could not start: {exc}", pytrace=False)
    except BaseException:
        node.close()
        epmd.close()
        raise
    return node, epmd


@pytest.fixture(scope="session")
def rabbitmq4_node(
    rabbitmq4_root: RabbitMQ4Root, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrivateRabbitMQ]:
    """One RabbitMQ 4 node for the session (the messaging core's V4 runs): each test gets its
    own vhost on it, as on the shared 3.10 broker."""
    node, epmd = start_rabbitmq4_node(rabbitmq4_root, tmp_path_factory.mktemp("rabbitmq4"))
    try:
        yield node
    finally:
        node.close()
        epmd.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for root in _used[:1]:
        terminalreporter.write_line(f"rabbitmq4-root: {root.describe()}")
