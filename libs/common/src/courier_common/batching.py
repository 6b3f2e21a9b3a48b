"""Redis commands issued in one turn of the event loop go out as one pipeline.

A consumer with ``prefetch`` deliveries in flight makes two Redis calls per delivery (the
idempotency claim, then the done mark), and every call on its own costs a connection checkout,
a ``send`` and a ``recv``: with 100 deliveries in flight, that is the most expensive thing the
worker does. :class:`CommandBatcher` queues the commands the concurrent deliveries issue
during one loop iteration and sends them together, in order, as a non-transactional pipeline
on one connection: one write, one read of all the replies (packed by hiredis, sent and read on
one of the client's own pooled connections). Each caller still gets its own
reply or its own error, and still waits for it before going on, so a protocol that needs the
claim before the work and the done mark after it keeps that order. redis-py's asyncio client
has no auto-pipelining of its own.

A command that fails (a script Redis does not know, a wrong type) fails alone; a connection
that fails fails every command of its batch, as it would have failed each of them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ResponseError

#: Commands per pipeline at most; more wait for the next one.
MAX_BATCH = 256

#: One queued command: its arguments, and who waits for the reply.
_Command = tuple[tuple[Any, ...], "asyncio.Future[Any]"]


class CommandBatcher:
    """Coalesces concurrent Redis commands into pipelines (see the module docstring)."""

    def __init__(self, redis: Redis, *, max_batch: int = MAX_BATCH) -> None:
        self.redis = redis
        self.max_batch = max_batch
        self._pending: list[_Command] = []
        self._scheduled = False
        self._sending: set[asyncio.Task[None]] = set()

    async def execute(self, *args: Any) -> Any:
        """Run one command (``"SET", key, value, "NX"``…) in the next batch; its raw reply.

        The reply is what Redis answered, decoded as the client's connections decode
        (``bytes`` unless it was made with ``decode_responses``), with none of redis-py's
        per-command reply callbacks: ``SET`` answers ``b"OK"`` or None, not True. An error
        reply raises its :class:`~redis.exceptions.ResponseError` in this caller alone.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((args, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._scheduled = False
        while self._pending:
            batch, self._pending = (
                self._pending[: self.max_batch],
                self._pending[self.max_batch :],
            )
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Command]) -> None:
        live = [command for command in batch if not command[1].done()]
        if not live:
            return
        try:
            replies = await self._round_trip([args for args, _ in live])
        except BaseException as exc:  # the connection failed: every command of the batch did
            for _, future in live:
                _fail(future, _copy(exc))
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), reply in zip(live, replies, strict=True):
            if isinstance(reply, Exception):
                _fail(future, reply)
            elif not future.done():  # the caller may have been cancelled meanwhile
                future.set_result(reply)

    async def _round_trip(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send *commands* on one pooled connection in one write; their raw replies, in order.

        What redis-py's pipeline does, without the parts a batch of independent commands does
        not need (a Pipeline object and its command stack per batch, reply callbacks,
        per-operation telemetry) and with the commands packed by hiredis, in C, where redis-py's
        asyncio connection packs them in Python. The connection is redis-py's, from the
        client's pool (Sentinel's included: a demoted primary's READONLY error makes it find
        the new one), and a connection error is retried on a fresh connection as the client's
        retry policy says, as redis-py retries a pipeline.
        """
        pool = self.redis.connection_pool
        connection: Connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        packed = b"".join([hiredis.pack_command(command) for command in commands])

        async def attempt() -> list[Any]:
            await connection.send_packed_command(packed)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as exc:  # this command failed, not the connection
                    replies.append(exc)
            return replies

        async def reconnect(_error: Exception) -> None:
            await connection.disconnect()

        try:
            return await connection.retry.call_with_retry(attempt, reconnect)
        except BaseException:
            await connection.disconnect()  # replies may still be on the way: never reuse it
            raise
        finally:
            await pool.release(connection)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _copy(exc: BaseException) -> BaseException:
    """A fresh exception per waiter, so tracebacks do not pile up on one object."""
    if isinstance(exc, asyncio.CancelledError):
        return asyncio.CancelledError()
    try:
        clone = type(exc)(*exc.args)
    except Exception:
        return exc
    clone.__cause__ = exc
    return clone
