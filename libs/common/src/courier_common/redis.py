"""One Redis client per process: one node, or the primary that Redis Sentinel names.

Every service builds its client here (`connect`), so the store, the outbox relay, the
idempotency claims, the erased-user marks and the dead-letter archive all reach Redis the same
way and behave the same way through a failover.

**A pool that waits.** redis-py's default pool raises ``MaxConnectionsError`` the moment it
runs out; a burst of requests would then answer 500. A blocking pool makes a request wait (up
to ``timeout``) for a connection, which under load is the behaviour a user expects: slower, not
broken. The Sentinel pool is the same blocking pool.

**No command is re-sent.** The connections are built without a redis-py ``Retry``: a command
that failed on a dying connection may have run (a registration written, then the server gone
before it answered), and sending it again could apply it twice. The caller sees the error; an
HTTP client gets the 503 "may have been applied" and retries with its Idempotency-Key.

**Sentinel** (`RedisTarget` with ``sentinels``). Each new connection asks the Sentinels for
the primary (redis-py's ``SentinelManagedConnection``), and a primary that was demoted answers
a write with ``READONLY``, which redis-py turns into a ``ConnectionError`` that drops the
connection. That alone leaves pooled connections on a demoted primary that is still up (a
planned ``SENTINEL FAILOVER``) for as long as that node takes to notice (Sentinel reconfigures
it about ten seconds later), and meanwhile they write to a node whose writes will be thrown
away. So the pool also asks the Sentinels at most every `SENTINEL_CHECK_SECONDS` when it hands
out a connection, and once the primary moved it closes every connection to the old one (idle
ones at once, busy ones when they come back). Lua scripts are not replicated in Redis 7: the
new primary answers EVALSHA with ``NOSCRIPT``; redis-py's ``Script`` loads the script and runs
it again, and `Durability` does the same for its pipelines.

**Replicas** (`Durability`). Redis replicates asynchronously: a write the primary acknowledged
can be lost when a replica that had not received it is promoted. ``WAIT n timeout`` blocks the
connection that wrote until *n* replicas have everything it wrote, so `Durability` sends the
write, a fence write and ``WAIT`` in one pipeline on one connection, and raises
`NotReplicatedError` when fewer replicas confirmed in time. The fence (``INCR`` of one key)
makes ``WAIT`` cover what the commands *found* as well as what they wrote: a replica that
confirms the fence has everything the primary had before it, so a replayed response or an
already-archived record is as safe to acknowledge as a fresh write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import redis.exceptions
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import AbstractConnection, SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from courier_common.logging import get_logger

__all__ = [
    "SENTINEL_CHECK_SECONDS",
    "STORAGE_ERRORS",
    "Durability",
    "NotReplicatedError",
    "RedisTarget",
    "connect",
    "is_unavailable",
    "parse_sentinels",
]

#: How often, at most, a Sentinel pool asks the Sentinels whether the primary moved.
SENTINEL_CHECK_SECONDS: Final = 0.5
#: Socket timeouts towards the Sentinels: a dead one must not hold up finding the primary.
SENTINEL_SOCKET_TIMEOUT: Final = 2.0
#: Error codes of replies that mean "this node cannot serve that now", not "your command is
#: wrong": a primary without enough replicas (``min-replicas-to-write``), a replica that lost
#: its primary, a blocked command cut off by a role change, a script running too long.
_UNAVAILABLE_CODES: Final = frozenset({"NOREPLICAS", "MASTERDOWN", "UNBLOCKED", "BUSY"})

log = get_logger(__name__)


class NotReplicatedError(redis.exceptions.ConnectionError):
    """A write reached the primary, but fewer replicas than required confirmed it in time.

    The write is in doubt, not refused: it may survive (the replicas get it a moment later) or
    be taken back by a failover. It is a ``ConnectionError`` because callers must treat it like
    Redis being away: retry later, or answer 503.
    """

    def __init__(self, confirmed: int, required: int, timeout_ms: int) -> None:
        super().__init__(
            f"{confirmed} of {required} required Redis replicas confirmed the write "
            f"within {timeout_ms} ms"
        )
        self.confirmed = confirmed
        self.required = required
        self.timeout_ms = timeout_ms


def is_unavailable(exc: BaseException) -> bool:
    """True when *exc* means Redis cannot serve now (retry later), not a bug in the command.

    Connection and timeout errors (``LOADING``, a demoted primary's ``READONLY`` through a
    Sentinel pool, `NotReplicatedError` included), and the replies that mean the same: a
    ``READONLY`` or ``MASTERDOWN`` replica, ``NOREPLICAS``, ``UNBLOCKED``, ``BUSY``,
    ``TRYAGAIN``, and ``NOSCRIPT`` (a script cache emptied by a restart or a failover between
    loading and running a script: nothing ran).
    """
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return True
    if isinstance(
        exc,
        redis.exceptions.ReadOnlyError
        | redis.exceptions.NoScriptError
        | redis.exceptions.TryAgainError
        | redis.exceptions.ClusterDownError,
    ):
        return True
    if isinstance(exc, redis.exceptions.ResponseError):
        text = str(exc.args[0]) if exc.args else ""
        return text.split(" ", 1)[0] in _UNAVAILABLE_CODES
    return False


class _StorageErrors:
    """Redis's errors as HTTP problem handling answers them: 503 "retry", or a bug (500).

    A `courier_common.http.StorageErrors`, described without importing the HTTP code: every
    connection and timeout error (`NotReplicatedError`, whose write is in doubt, included), and
    the error replies that `is_unavailable` accepts; any other reply is about the command.
    """

    types: Final = (
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        redis.exceptions.ResponseError,
    )

    def is_unavailable(self, exc: Exception) -> bool:
        return is_unavailable(exc)

    def unconfirmed_replicas(self, exc: Exception) -> tuple[int, int] | None:
        if isinstance(exc, NotReplicatedError):
            return exc.required, exc.confirmed
        return None


#: What a service with a Redis store passes to `courier_common.http.install_problem_handlers`
#: (``unavailable=STORAGE_ERRORS``), so Redis being away is a 503 the client may retry.
STORAGE_ERRORS: Final = _StorageErrors()


def parse_sentinels(text: str) -> tuple[tuple[str, int], ...]:
    """``host:port,host:port`` (IPv6 as ``[::1]:26379``) as pairs; ValueError when malformed."""
    addresses: list[tuple[str, int]] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise ValueError("an empty entry: expected host:port,host:port")
        if item.startswith("["):
            host, sep, port = item[1:].partition("]:")
        else:
            host, sep, port = item.rpartition(":")
            if ":" in host:
                raise ValueError(f"{item!r}: write an IPv6 address as [address]:port")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{item!r} is not host:port (port 1-65535)")
        if (host, int(port)) in addresses:
            raise ValueError(f"{item!r} is listed twice")
        addresses.append((host, int(port)))
    return tuple(addresses)


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where Redis is: ``url`` alone, or the Sentinels and the master name they watch.

    With Sentinels, ``url`` still gives the data nodes' scheme (``rediss`` for TLS, with its
    ``ssl_*`` query options), credentials and database; its host and port are not used: the
    Sentinels say where the primary is. The Sentinels have their own credentials and TLS
    switch (Redis does not share ACL users between Sentinels and data nodes).
    """

    url: str
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    sentinel_tls: bool = False

    def __post_init__(self) -> None:
        if bool(self.sentinels) != bool(self.service):
            raise ValueError("Sentinels and the master name go together: give both or neither")


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """redis-py's Sentinel pool on the blocking pool, and quick to leave a moved primary.

    The MRO puts ``SentinelConnectionPool`` (master discovery, the ``READONLY`` handling of its
    connections) before ``BlockingConnectionPool`` (wait for a free connection).
    """

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self._next_check = 0.0
        self._check: asyncio.Future[None] | None = None

    async def get_connection(self, *_args: Any, **_options: Any) -> AbstractConnection:
        loop = asyncio.get_running_loop()
        if loop.time() >= self._next_check:
            self._next_check = loop.time() + SENTINEL_CHECK_SECONDS
            self._check = asyncio.ensure_future(self._check_master())
        if self._check is not None and not self._check.done():
            # Everyone waits for the answer: a connection handed out meanwhile could still
            # be one to the old primary.
            await asyncio.shield(self._check)
        connection: AbstractConnection = await BlockingConnectionPool.get_connection(  # type: ignore[no-untyped-call]
            self
        )
        return connection

    async def _check_master(self) -> None:
        """Ask the Sentinels where the primary is; closes idle connections if it moved.

        When no Sentinel answers (they restart, say) the pool keeps the primary it knows: the
        primary can still serve, and a connection to a dead one fails on its own.
        """
        if self.master_address is None:
            return  # nothing connected yet: the first connection asks anyway
        previous = self.master_address
        try:
            await self.get_master_address()  # type: ignore[no-untyped-call]
        except redis.exceptions.RedisError as exc:
            log.debug("redis_sentinel_check_failed", error=repr(exc))
            return
        if self.master_address != previous:
            log.warning(
                "redis_primary_moved",
                service=self.service_name,
                previous=_address(previous),
                primary=_address(self.master_address),
            )

    async def release(self, connection: AbstractConnection) -> None:
        host = getattr(connection, "host", None)
        port = getattr(connection, "port", None)
        if self.master_address is not None and (host, port) != tuple(self.master_address):
            # Connected to a node that is no longer the primary: never hand it out again.
            await connection.disconnect()
        await super().release(connection)

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            await self.sentinel_manager.aclose()


def _address(address: object) -> str:
    if isinstance(address, tuple | list) and len(address) == 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def connect(
    target: str | RedisTarget,
    *,
    max_connections: int = 64,
    timeout: float = 10.0,
    socket_timeout: float | None = 10.0,
) -> Redis:
    """A client on a bounded, blocking pool; ``socket_timeout`` must outlast blocking reads.

    *target* is a Redis URL, or a `RedisTarget` (which may name Sentinels). The client does
    no I/O until its first command.
    """
    if isinstance(target, str):
        target = RedisTarget(url=target)
    common: dict[str, Any] = {
        "max_connections": max_connections,
        "timeout": timeout,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": 5,
        "health_check_interval": 30,
    }
    if not target.sentinels:
        pool = BlockingConnectionPool.from_url(target.url, **common)
        return Redis(connection_pool=pool)
    assert target.service is not None
    node: dict[str, Any] = dict(parse_url(target.url))
    if node.pop("connection_class", None) is SSLConnection:
        node["ssl"] = True
    elif any(key.startswith("ssl_") for key in node):
        raise ValueError("ssl_* options in the Redis URL need the rediss:// scheme")
    node.pop("host", None)
    node.pop("port", None)
    no_retry = Retry(NoBackoff(), 0)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels),
        sentinel_kwargs={
            "socket_timeout": SENTINEL_SOCKET_TIMEOUT,
            "socket_connect_timeout": SENTINEL_SOCKET_TIMEOUT,
            "username": target.sentinel_username,
            "password": target.sentinel_password,
            "ssl": target.sentinel_tls,
            "retry": no_retry,
        },
    )
    client: Redis = sentinel.master_for(
        target.service,
        connection_pool_class=_BlockingSentinelPool,
        **common,
        **node,
    )
    return client


@dataclass(frozen=True, slots=True)
class Durability:
    """Writes confirmed by ``min_replicas`` replicas (``WAIT``) before anyone relies on them.

    ``min_replicas=0`` sends the commands as they are, with no ``WAIT``. Otherwise the
    commands, an ``INCR`` of ``fence_key`` and ``WAIT min_replicas timeout_ms`` go in one
    pipeline on one connection, and fewer confirmations than ``min_replicas`` raise
    `NotReplicatedError`. The commands must be safe to run again: a ``NOSCRIPT`` reply (the
    primary's script cache is empty after a restart or a failover; nothing ran) loads the
    script and sends the pipeline once more.
    """

    min_replicas: int = 0
    timeout_ms: int = 1000
    fence_key: str = "courier:replication-fence"

    def __post_init__(self) -> None:
        if self.min_replicas < 0:
            raise ValueError("min_replicas must be >= 0")
        if self.timeout_ms < 1:
            raise ValueError("timeout_ms must be >= 1 (WAIT 0 would block for ever)")

    @property
    def enabled(self) -> bool:
        return self.min_replicas > 0

    async def script(
        self,
        client: Redis,
        script: AsyncScript,
        *,
        keys: Sequence[Any],
        args: Sequence[Any],
    ) -> Any:
        """Run a registered script; its reply once the replicas confirmed it."""
        if not self.enabled:
            return await script(keys=keys, args=args)

        def queue(pipe: Pipeline) -> None:
            pipe.evalsha(script.sha, len(keys), *keys, *args)

        for attempt in (1, 2):
            try:
                (reply,) = await self.commands(client, queue)
            except redis.exceptions.NoScriptError:
                if attempt == 2:
                    raise
                script.sha = await client.script_load(script.script)
                continue
            return reply
        raise AssertionError("unreachable")  # pragma: no cover

    async def commands(self, client: Redis, queue: Callable[[Pipeline], object]) -> list[Any]:
        """Send what *queue* puts in a pipeline; its replies once the replicas confirmed it.

        The first error reply is raised (after every reply was read), as redis-py does.
        """
        async with client.pipeline(transaction=False) as pipe:
            queue(pipe)
            queued = len(pipe.command_stack)
            if self.enabled:
                pipe.incr(self.fence_key)
                pipe.wait(self.min_replicas, self.timeout_ms)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        if self.enabled:
            confirmed = int(replies[-1])
            if confirmed < self.min_replicas:
                raise NotReplicatedError(confirmed, self.min_replicas, self.timeout_ms)
        return replies[:queued]
