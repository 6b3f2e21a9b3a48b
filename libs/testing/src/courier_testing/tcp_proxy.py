"""A small TCP proxy the fault tests put between the services and RabbitMQ.

It runs an asyncio loop in a daemon thread of the test process, so a synchronous test can
steer it while real service processes talk through it::

    with TcpProxy("127.0.0.1", broker.amqp_port) as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        proxy.set_latency(0.1)   # every chunk, each way, arrives 100 ms after it was read
        proxy.reset_all()        # RST (SO_LINGER 0) every current connection, both sides
        proxy.refuse_new(True)   # new connections are reset at once, current ones flow on
        proxy.blackhole(True)    # nothing is forwarded (a partition); lifted, it all flows

Latency is a delay, not a throttle: each chunk is stamped when read and written once its
time has come, so a stream keeps its throughput and its order. A blackhole holds the bytes
(TCP would retransmit them after a partition heals): nothing is dropped mid-stream, which
would corrupt the protocol's framing in a way no real network does.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self, TypeVar

__all__ = ["TcpProxy"]

_CHUNK: Final[int] = 65536
_T = TypeVar("_T")


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    """Close the socket so the peer gets an RST, not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's socket and ours to the upstream."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def reset(self) -> None:
        for task in self.tasks:
            task.cancel()
        _abort_with_rst(self.client)
        _abort_with_rst(self.upstream)


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream_host:upstream_port``, with faults on demand.

    Every control is safe to call from any thread and takes effect before it returns.
    """

    def __init__(
        self, upstream_host: str, upstream_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = host
        self.port = port
        self.accepted = 0
        """Connections accepted and forwarded."""
        self.refused = 0
        """Connections reset at once because new connections were refused."""
        self.resets = 0
        """Connections reset by :meth:`reset_all`."""
        self._latency = 0.0
        self._refusing = False
        self._links: set[_Link] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> Self:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="tcp-proxy", daemon=True)
        self._thread.start()
        self._call(self._start())
        return self

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        """Stop listening and reset every connection. Idempotent."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._close(), loop)
        with contextlib.suppress(Exception):
            future.result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        if not loop.is_running():
            loop.close()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.reset()
        self._links.clear()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- controls ---------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def active(self) -> int:
        """Connections currently proxied."""
        return len(self._links)

    def set_latency(self, seconds: float) -> None:
        """Delay every chunk by *seconds* in each direction (0 turns it off)."""
        if seconds < 0:
            raise ValueError("latency cannot be negative")
        self._latency = seconds

    def reset_all(self) -> int:
        """Reset every current connection on both sides (RST); return how many."""
        return self._call(self._reset_all())

    async def _reset_all(self) -> int:
        links = list(self._links)
        for link in links:
            link.reset()
        self._links.difference_update(links)
        self.resets += len(links)
        return len(links)

    def refuse_new(self, refuse: bool = True) -> None:
        """Reset new connections as soon as they arrive; current ones are untouched."""
        self._refusing = refuse

    def blackhole(self, on: bool = True) -> None:
        """Stop forwarding bytes either way (held, not dropped) until called with False."""
        self._call(self._set_flowing(not on))

    async def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the proxy is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    # --- forwarding -------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            self.refused += 1
            _abort_with_rst(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            _abort_with_rst(writer)
            return
        self.accepted += 1
        link = _Link(client=writer, upstream=up_writer)
        self._links.add(link)
        link.tasks = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        # Both directions end by EOF (closed in turn), or one breaks: then both are reset.
        done, _ = await asyncio.wait(link.tasks, return_when=asyncio.FIRST_EXCEPTION)
        if link not in self._links:
            return  # reset_all() or close() got there first
        self._links.discard(link)
        if any(not t.cancelled() and t.exception() is not None for t in done):
            link.reset()
        else:
            writer.close()
            up_writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One direction: read chunks, stamp them, write each when its latency has passed."""
        loop = asyncio.get_running_loop()
        pending: asyncio.Queue[tuple[float, bytes | BaseException]] = asyncio.Queue()

        async def read() -> None:
            try:
                while chunk := await reader.read(_CHUNK):
                    pending.put_nowait((loop.time() + self._latency, chunk))
            except OSError as exc:  # reset by the peer: pass it on once the bytes before it are
                pending.put_nowait((loop.time() + self._latency, exc))
                return
            pending.put_nowait((loop.time() + self._latency, b""))  # EOF

        async def write() -> None:
            assert self._flowing is not None
            while True:
                due, item = await pending.get()
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._flowing.wait()
                if isinstance(item, BaseException):
                    raise item
                if not item:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(item)
                await writer.drain()

        reading = asyncio.create_task(read())
        try:
            await write()
        finally:
            reading.cancel()
