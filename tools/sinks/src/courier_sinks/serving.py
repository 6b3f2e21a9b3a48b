"""Running the sinks' servers on a private event loop thread, on sockets bound up front.

Both sinks run the same way in a test and in ``make run``: their servers live on an event
loop in a background thread, and the caller's thread (a test, or the console script's main
thread waiting for SIGTERM) stays free. That keeps in-process tests independent of whatever
event loop the test itself runs, and means the console scripts exercise the same code.

Sockets are bound before any server starts, synchronously: port 0 then yields a free port
that is known the moment `bind` returns, and a port already in use fails `start()` with an
`OSError` in the caller's thread instead of somewhere inside a server task.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

import uvicorn
from starlette.types import ASGIApp

__all__ = ["BackgroundLoop", "UvicornService", "bind", "display_address"]

T = TypeVar("T")

# How long a stopping HTTP server lets in-flight requests finish (a request held by an
# artificial delay included) before it cancels them: a test double should stop fast.
GRACEFUL_SHUTDOWN_SECONDS = 1
START_TIMEOUT_SECONDS = 10.0


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (*host*, *port*); port 0 picks a free one."""
    family, type_, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def display_address(sock: socket.socket) -> tuple[str, int]:
    """(host, port) as a URL wants them: the real port, IPv6 hosts in brackets."""
    host, port = sock.getsockname()[:2]
    return (f"[{host}]" if ":" in host else host), int(port)


class BackgroundLoop:
    """An asyncio event loop running forever in a daemon thread, fed coroutines from outside."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        loop = asyncio.new_event_loop()
        running = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(running.set)
            try:
                loop.run_forever()
                # Whatever is still running (an SMTP session, a delayed request) is cancelled
                # so the loop closes cleanly instead of warning about pending tasks.
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=self._name, daemon=True)
        self._thread.start()
        running.wait()
        self._loop = loop

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = START_TIMEOUT_SECONDS) -> T:
        """Run *coro* on the loop and wait for its result (or its exception) here."""
        if self._loop is None:
            coro.close()
            raise RuntimeError(f"{self._name} is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def close(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)


class _QuietServer(uvicorn.Server):
    """uvicorn that leaves signals alone: whoever owns the process decides when we stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class UvicornService:
    """One ASGI app served by uvicorn on an already bound socket, inside a running loop."""

    def __init__(self, app: ASGIApp, sock: socket.socket) -> None:
        config = uvicorn.Config(
            app,
            lifespan="off",
            http="h11",  # the same protocol code wherever it runs, httptools installed or not
            ws="none",
            log_config=None,  # the process's logging setup, not uvicorn's, decides the format
            access_log=False,  # the sink's own records say what was requested
            server_header=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        )
        self._server = _QuietServer(config)
        self._sock = sock
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start serving; return once uvicorn says it is started, raise if it died trying."""
        task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        self._task = task
        while not self._server.started:
            if task.done():
                task.result()  # raises what stopped it
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._task = None
