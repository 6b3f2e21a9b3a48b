"""The fault suite's TCP proxy (courier_testing.tcp_proxy) against a plain echo server."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from courier_testing.tcp_proxy import TcpProxy


class _EchoHandler(socketserver.BaseRequestHandler):
    server: _EchoServer

    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except ConnectionResetError:
            self.server.resets += 1
            return
        self.server.closes += 1


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        self.resets = 0
        self.closes = 0


@pytest.fixture
def echo() -> Iterator[_EchoServer]:
    server = _EchoServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(echo: _EchoServer) -> Iterator[TcpProxy]:
    with TcpProxy("127.0.0.1", echo.server_address[1]) as proxy:
        yield proxy


def connect(proxy: TcpProxy) -> socket.socket:
    sock = socket.create_connection(proxy.address, timeout=10)
    sock.settimeout(10)
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def round_trip(proxy: TcpProxy, data: bytes) -> bytes:
    """Send *data* on a new connection and read as much back."""
    with connect(proxy) as sock:
        sock.sendall(data)
        return recv_exactly(sock, len(data))


def until(check: object, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not callable(check) or not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_forwards_both_ways_and_passes_the_close_on(proxy: TcpProxy, echo: _EchoServer) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"hello")
        assert recv_exactly(sock, 5) == b"hello"
        assert proxy.active == 1
    until(lambda: echo.closes == 1 and proxy.active == 0, "the close to reach the server")
    assert proxy.accepted == 1


def test_latency_delays_each_direction_and_keeps_the_order(proxy: TcpProxy) -> None:
    proxy.set_latency(0.2)
    with connect(proxy) as sock:
        started = time.monotonic()
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        assert time.monotonic() - started >= 0.4  # 0.2 s there, 0.2 s back
        payload = b"".join(b"%05d" % n for n in range(2000))
        for n in range(0, len(payload), 100):
            sock.sendall(payload[n : n + 100])
        assert recv_exactly(sock, len(payload)) == payload


def test_reset_all_resets_both_sides(proxy: TcpProxy, echo: _EchoServer) -> None:
    with connect(proxy) as sock:
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
        assert proxy.reset_all() == 1
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
    until(lambda: echo.resets == 1, "the server to see the reset")
    assert proxy.resets == 1
    assert proxy.active == 0


def test_refused_connections_are_reset_and_current_ones_flow_on(proxy: TcpProxy) -> None:
    with connect(proxy) as current:
        current.sendall(b"a")
        assert recv_exactly(current, 1) == b"a"  # the proxy has taken it on
        proxy.refuse_new()
        with pytest.raises((ConnectionResetError, EOFError)):
            round_trip(proxy, b"y")
        current.sendall(b"still")
        assert recv_exactly(current, 5) == b"still"
        proxy.refuse_new(False)
        assert round_trip(proxy, b"z") == b"z"
    assert proxy.refused == 1


def test_blackhole_holds_the_bytes_until_lifted(proxy: TcpProxy) -> None:
    with connect(proxy) as sock:
        proxy.blackhole()
        sock.sendall(b"held")
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(4)
        proxy.blackhole(False)
        sock.settimeout(10)
        assert recv_exactly(sock, 4) == b"held"
