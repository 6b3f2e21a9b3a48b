"""One robust AMQP connection per process.

aio-pika's robust connection reconnects and restores the channels, exchanges, queues,
bindings and consumers declared through it, but it holds channels weakly: this class keeps
strong references so nothing is garbage-collected out from under a long-running worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from yarl import URL

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

_CLOSE_ERRORS: tuple[type[BaseException], ...] = (
    *CONNECT_ERRORS,
    aio_pika.exceptions.ChannelClosed,
)


def redact_url(url: str) -> str:
    """The URL with its password hidden, for logs and error messages."""
    parsed = URL(url)
    return str(parsed.with_password("***")) if parsed.password else url


class AmqpConnection:
    """The process's one broker connection, and the channels opened on it."""

    def __init__(
        self,
        url: str,
        *,
        client_name: str,
        heartbeat: int = 30,
        reconnect_interval: float = 1.0,
    ) -> None:
        self.url = url
        self.client_name = client_name
        self.heartbeat = heartbeat
        self.reconnect_interval = reconnect_interval
        self._connection: AbstractRobustConnection | None = None
        self._channels: list[AbstractRobustChannel] = []
        self._closing = False

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

    async def connect(self, *, timeout: float | None = 30.0) -> AmqpConnection:
        """Connect, retrying with backoff until ``timeout`` (None: forever).

        Only the first connection needs this loop; after that aio-pika reconnects by itself.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        delay = 0.2
        while True:
            try:
                self._connection = await aio_pika.connect_robust(
                    self.url,
                    client_properties={
                        "connection_name": f"{self.client_name}@{socket.gethostname()}"
                        f":{os.getpid()}",
                    },
                    heartbeat=self.heartbeat,
                    reconnect_interval=self.reconnect_interval,
                    timeout=10,
                )
            except CONNECT_ERRORS as exc:
                if deadline is not None and loop.time() + delay > deadline:
                    raise ConnectionError(
                        f"cannot reach RabbitMQ at {redact_url(self.url)}: {exc!r}"
                    ) from exc
                log.warning(
                    "amqp_connect_failed",
                    url=redact_url(self.url),
                    error=repr(exc),
                    retry_in_s=round(delay, 2),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._connection.reconnect_callbacks.add(self._on_reconnect)
            self._connection.close_callbacks.add(self._on_close)
            log.info("amqp_connected", url=redact_url(self.url))
            return self

    def _on_reconnect(self, *_: Any) -> None:
        log.info("amqp_reconnected", url=redact_url(self.url))

    def _on_close(self, _connection: Any, exc: BaseException | None = None) -> None:
        if exc is not None and not self._closing:
            log.warning("amqp_connection_lost", url=redact_url(self.url), error=repr(exc))

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
