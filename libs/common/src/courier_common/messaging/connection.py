"""One robust AMQP connection per process, to whichever node of the cluster answers.

aio-pika's robust connection reconnects and restores the channels, exchanges, queues,
bindings and consumers declared through it, but it holds channels weakly: this class keeps
strong references so nothing is garbage-collected out from under a long-running worker.

``COURIER_AMQP_URL`` may name several nodes (comma-separated, one URL per node of one
cluster). The first connection tries them in turn; after that :class:`NodeRotatingConnection`
moves on to the next node whenever the connection is lost or an attempt fails, so a
reconnect never waits for the node that just died while another one is up.

A broker that answers and refuses (wrong credentials, an unknown vhost, no access to it) is
configuration, not an outage: it is logged once as critical with the broker's own reply, then
retried with a longer backoff and a bounded warning rate (an operator may create the vhost),
and :attr:`AmqpConnection.problem` says why for ``/readyz``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Sequence
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aio_pika.connection import make_url
from yarl import URL

from courier_common.backoff import Backoff
from courier_common.logging import get_logger

log = get_logger(__name__)

#: Frames a connection may have queued for its writer task before a publisher has to wait.
#: aiormq's default is 10, and a publisher that waits holds its channel's lock, so once a
#: batch fills the queue each further publish costs one turn of the event loop (lock hand-off,
#: then the writer's turn): in a process that also serves HTTP a 200-message outbox batch
#: took 2 s under load instead of 30 ms. Memory stays bounded by what callers have in flight
#: (the relay's batch, a consumer's prefetch), which this number comfortably exceeds.
WRITE_QUEUE_FRAMES = 4096
aiormq.Connection.FRAME_BUFFER_SIZE = WRITE_QUEUE_FRAMES

#: aio-pika/aiormq errors that mean "the broker is not reachable right now".
CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
    aio_pika.exceptions.AMQPConnectionError,
)
#: What a first connection attempt may raise besides those: aiormq reports a broker that
#: closes the connection at ``Connection.Open`` (unknown vhost, no access) as a frame error.
_ATTEMPT_ERRORS: tuple[type[BaseException], ...] = (*CONNECT_ERRORS, aiormq.exceptions.AMQPError)
#: Reply codes of a connection the broker refused: 403 ACCESS_REFUSED (credentials),
#: 530 NOT_ALLOWED (vhost unknown or not permitted), 402 INVALID_PATH.
_REFUSAL_CODES = frozenset({402, 403, 530})
_REFUSAL_TEXT = ("ACCESS_REFUSED", "NOT_ALLOWED", "INVALID_PATH")
#: Backoff caps: an outage is retried quickly, a refusal (it needs an operator) less often.
_OUTAGE_BACKOFF_MAX = 5.0
_REFUSAL_BACKOFF_MAX = 15.0
#: At most one warning per this many seconds while the first connection keeps failing.
_WARN_EVERY_SECONDS = 30.0

_CLOSE_ERRORS: tuple[type[BaseException], ...] = (
    *CONNECT_ERRORS,
    aio_pika.exceptions.ChannelClosed,
)


def redact_url(url: str) -> str:
    """The URL with its password hidden, for logs and error messages (each URL of a list)."""
    if "," in url:
        return ",".join(redact_url(part.strip()) for part in url.split(","))
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return "<unparseable URL>"
    return str(parsed.with_password("***")) if parsed.password else url


def split_amqp_urls(value: str | Sequence[str]) -> tuple[str, ...]:
    """The node URLs of ``COURIER_AMQP_URL``: comma-separated, blanks dropped, order kept."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    urls = tuple(part.strip() for part in parts if part.strip())
    if not urls:
        raise ValueError("no AMQP URL given")
    return urls


def broker_refusal(exc: BaseException) -> str | None:
    """The broker's reply when *exc* is the broker refusing us (not an outage), else None."""
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return str(exc.args[0]) if exc.args else "ACCESS_REFUSED"
    if isinstance(exc, aiormq.exceptions.AuthenticationError):
        return f"no common authentication mechanism: {exc}"
    if isinstance(exc, aiormq.exceptions.ConnectionClosed) and len(exc.args) >= 2:
        code, text = exc.args[0], exc.args[1]
        if code in _REFUSAL_CODES:
            return f"{text} ({code})"
        return None
    if isinstance(exc, aiormq.exceptions.InvalidFrameError):
        text = str(exc.args[0] if exc.args else exc)
        if "Connection.Close" in text and any(word in text for word in _REFUSAL_TEXT):
            # "Expected ... OpenOk, got <Connection.Close reply_code=530 reply_text='...'>"
            # (the repr comes from courier_common.messaging._pamqp_compat).
            return text.split("got ", 1)[-1].strip("<>")
    return None


def _vhost_of(url: str) -> str:
    path = URL(url).path
    return path[1:] if len(path) > 1 else "/"


def broker_state(connection: AmqpConnection) -> str:
    """``/readyz``'s word for the connection: connected, refused or disconnected."""
    if connection.is_connected:
        return "connected"
    return "refused" if connection.refused else "disconnected"


class NodeRotatingConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection over the nodes of a cluster, moving on when one fails.

    aio-pika reconnects to ``self.url`` (each attempt calls ``Connection.connect``, which
    reads it) and reports every lost connection and every failed attempt through
    ``_on_connection_close`` (``UnderlayConnection.connect`` calls it before it raises).
    That is where the next node's URL is put in place, so the following attempt, after
    ``reconnect_interval``, goes there. Everything else is aio-pika's: restoring channels,
    topology and consumers after the reconnect.
    """

    def __init__(
        self,
        urls: Sequence[URL],
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        first: int = 0,
        **kwargs: Any,
    ) -> None:
        if not urls:
            raise ValueError("NodeRotatingConnection needs at least one URL")
        self.node_urls: tuple[URL, ...] = tuple(urls)
        self.node_index = first % len(self.node_urls)
        super().__init__(self.node_urls[self.node_index], loop=loop, **kwargs)

    def next_node(self) -> URL:
        """Make the next node's URL the one the next attempt uses; return it."""
        self.node_index = (self.node_index + 1) % len(self.node_urls)
        self.url = self.node_urls[self.node_index]
        return self.url

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if not self._close_called and len(self.node_urls) > 1:
            self.next_node()
        await super()._on_connection_close(closing)


class AmqpConnection:
    """The process's one broker connection, and the channels opened on it."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        client_name: str,
        heartbeat: int = 30,
        reconnect_interval: float = 1.0,
    ) -> None:
        self.urls: tuple[str, ...] = split_amqp_urls(url)
        self.client_name = client_name
        self.heartbeat = heartbeat
        self.reconnect_interval = reconnect_interval
        self._connection: NodeRotatingConnection | None = None
        self._channels: list[AbstractRobustChannel] = []
        self._closing = False
        self._node = 0
        self._problem: str | None = "not connected yet"
        self._refused: str | None = None
        self._reported_refusal: str | None = None

    @property
    def url(self) -> str:
        """The node URL in use (connected, or the one being tried)."""
        if self._connection is not None:
            return self.urls[self._connection.node_index]
        return self.urls[self._node]

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise RuntimeError("AmqpConnection.connect() has not completed")
        return self._connection

    @property
    def is_connected(self) -> bool:
        """True while the underlying TCP connection is open (False while reconnecting)."""
        conn = self._connection
        return conn is not None and not conn.is_closed and conn.connected.is_set()

    @property
    def problem(self) -> str | None:
        """Why there is no connection right now (redacted, for ``/readyz``); None when up."""
        if self.is_connected:
            return None
        return self._problem

    @property
    def refused(self) -> bool:
        """True while the last attempt was refused by the broker (configuration)."""
        return not self.is_connected and self._refused is not None

    def _note_failure(self, url: str, exc: BaseException) -> str | None:
        """Record why *url* failed; log the critical line for a new refusal. Its reason."""
        refusal = broker_refusal(exc)
        if refusal is None:
            self._refused = None
            self._problem = f"cannot reach {redact_url(url)}: {exc!r}"
            return None
        self._refused = refusal
        self._problem = f"{redact_url(url)} refused the connection: {refusal}"
        if refusal != self._reported_refusal:
            self._reported_refusal = refusal
            log.critical(
                "amqp_refused",
                url=redact_url(url),
                vhost=_vhost_of(url),
                user=URL(url).user,
                broker_reply=refusal,
                hint="check COURIER_AMQP_URL: the user, its password, and that the vhost "
                "exists with permissions for that user; retrying until it is fixed",
            )
        return refusal

    async def connect(self, *, timeout: float | None = 30.0) -> AmqpConnection:
        """Connect to the first node that accepts, retrying until ``timeout`` (None: forever).

        Each round tries every node once; between rounds it backs off (longer when the broker
        refused than when nothing answered) and warns at most every 30 s. Only the first
        connection needs this loop; after that aio-pika reconnects by itself, node by node.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        backoff = Backoff(initial=0.2, maximum=_OUTAGE_BACKOFF_MAX)
        attempts = 0
        last_warning: float | None = None
        # What connect_robust does with its keyword arguments: aiormq reads the heartbeat
        # from the URL's query, aio-pika the reconnect interval.
        urls = [
            make_url(url, heartbeat=self.heartbeat, reconnect_interval=self.reconnect_interval)
            for url in self.urls
        ]
        client_properties = {
            "connection_name": f"{self.client_name}@{socket.gethostname()}:{os.getpid()}",
        }
        while True:
            url = self.urls[self._node]
            connection = NodeRotatingConnection(
                urls, first=self._node, client_properties=client_properties
            )
            try:
                await connection.connect(timeout=10)
            except _ATTEMPT_ERRORS as exc:
                attempts += 1
                refusal = self._note_failure(url, exc)
                with contextlib.suppress(*_CLOSE_ERRORS, aiormq.exceptions.AMQPError):
                    await connection.close()
                self._node = (self._node + 1) % len(self.urls)
                if self._node != 0:
                    continue  # the next node, now
                delay = backoff.next(
                    maximum=_REFUSAL_BACKOFF_MAX if refusal else _OUTAGE_BACKOFF_MAX
                )
                if deadline is not None and loop.time() + delay > deadline:
                    raise ConnectionError(
                        f"cannot connect to RabbitMQ ({self._problem}) after {attempts} attempts"
                    ) from exc
                now = loop.time()
                if last_warning is None or now - last_warning >= _WARN_EVERY_SECONDS:
                    last_warning = now
                    log.warning(
                        "amqp_connect_failed",
                        urls=redact_url(",".join(self.urls)),
                        error=self._problem,
                        attempts=attempts,
                        retry_in_s=round(delay, 2),
                    )
                await asyncio.sleep(delay)
                continue
            self._connection = connection
            self._problem = None
            self._refused = None
            connection.reconnect_callbacks.add(self._on_reconnect)
            connection.close_callbacks.add(self._on_close)
            log.info(
                "amqp_connected",
                url=redact_url(url),
                nodes=len(self.urls),
                **({"after_attempts": attempts} if attempts else {}),
            )
            return self

    def _on_reconnect(self, *_: Any) -> None:
        self._problem = None
        self._refused = None
        log.info("amqp_reconnected", url=redact_url(self.url))

    def _on_close(self, _connection: Any, exc: BaseException | None = None) -> None:
        if exc is None or self._closing:
            return
        # Called for the lost connection and for each failed reconnect attempt; the node
        # that failed is the one before the current (the rotation has already moved on).
        conn = self._connection
        failed = self.urls[(conn.node_index - 1) % len(self.urls)] if conn is not None else self.url
        was_refused = self._refused is not None
        if self._note_failure(failed, exc) is None or not was_refused:
            log.warning("amqp_connection_lost", url=redact_url(failed), error=repr(exc))

    async def channel(
        self,
        *,
        prefetch: int | None = None,
        publisher_confirms: bool = True,
    ) -> AbstractRobustChannel:
        """A robust channel kept alive for the life of the connection.

        Confirm channels raise on an unroutable ``mandatory`` publish instead of dropping it.
        """
        channel = await self.connection.channel(
            publisher_confirms=publisher_confirms,
            on_return_raises=publisher_confirms,
        )
        assert isinstance(channel, AbstractRobustChannel)
        if prefetch is not None:
            await channel.set_qos(prefetch_count=prefetch)
        self._channels.append(channel)
        return channel

    async def close(self) -> None:
        self._closing = True
        channels, self._channels = self._channels, []
        for channel in channels:
            if not channel.is_closed:
                with contextlib.suppress(*_CLOSE_ERRORS):
                    await channel.close()
        if self._connection is not None and not self._connection.is_closed:
            await self._connection.close()
        self._connection = None
