"""A free TCP port on 127.0.0.1, for a process a test or the benchmark starts."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port the kernel says is free now (bind to port 0, read it back, let it go).

    A server that is killed and restarted on its port wants one from below the ephemeral
    range instead: `courier_testing.private_services` picks those.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
