"""One Redis client per process, with a pool that waits instead of failing under a burst.

redis-py's default pool raises ``MaxConnectionsError`` the moment it runs out; a burst of
requests would then answer 500. A blocking pool makes a request wait (up to ``timeout``) for
a connection, which under load is the behaviour a user expects: slower, not broken.
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis


def connect(
    url: str,
    *,
    max_connections: int = 64,
    timeout: float = 10.0,
    socket_timeout: float | None = 10.0,
) -> Redis:
    """A client on a bounded, blocking pool; ``socket_timeout`` must outlast blocking reads."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=socket_timeout,
        socket_connect_timeout=5,
        health_check_interval=30,
    )
    return Redis(connection_pool=pool)
