"""Run Courier services as real processes in tests: free port, environment, readiness.

A service started here is the same console script a user runs (``uv run user-service``),
with its environment pointing at the test's vhost and Redis prefix. Its output goes to a log
file that failing assertions can show.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from courier_testing.env import process_env
from courier_testing.ports import free_port

REPO = Path(__file__).resolve().parents[2]


@dataclass
class ServiceProcess:
    """One running service; ``url`` is its HTTP base URL."""

    name: str
    port: int
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    _log: object = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, ready_path: str = "/readyz", timeout: float = 60) -> ServiceProcess:
        log = self.log_path.open("ab")
        script = Path(sys.executable).parent / self.name  # the venv's console script
        self.proc = subprocess.Popen(
            [str(script)],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.wait_ready(ready_path, timeout=timeout)
        return self

    def wait_ready(self, path: str = "/readyz", *, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url + path, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        pytest.fail(f"{self.name} was not ready within {timeout}s:\n{self.logs()}")

    def logs(self, tail: int = 6000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-tail:]

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.proc.returncode)


class ServiceRunner:
    """Starts services for one test and stops every one of them afterwards."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[ServiceProcess] = []

    def start(
        self,
        name: str,
        env: Mapping[str, str],
        *,
        port: int | None = None,
        ready_path: str = "/readyz",
        timeout: float = 60,
    ) -> ServiceProcess:
        port = port or free_port()
        full_env = {**os.environ, **process_env(port), **env}
        service = ServiceProcess(
            name=name,
            port=port,
            log_path=self.log_dir / f"{name}-{len(self.started)}.log",
            env=full_env,
        )
        self.started.append(service)
        return service.start(ready_path=ready_path, timeout=timeout)

    def close(self) -> None:
        for service in self.started:
            service.kill()


@pytest.fixture
def services(tmp_path: Path) -> Iterator[ServiceRunner]:
    runner = ServiceRunner(tmp_path)
    yield runner
    runner.close()
