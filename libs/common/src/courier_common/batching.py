"""Redis commands issued in one turn of the event loop go out as one pipeline.

A consumer with ``prefetch`` deliveries in flight makes two Redis calls per delivery (the
idempotency claim, then the done mark), and every call on its own costs a connection checkout,
a ``send`` and a ``recv``: with 100 deliveries in flight, that is the most expensive thing the
worker does. :class:`CommandBatcher` queues the commands the concurrent deliveries issue
during one loop iteration and sends them together, in order, as a non-transactional pipeline
on one connection: one write, one read of all the replies. Each caller still gets its own
reply or its own error, and still waits for it before going on, so a protocol that needs the
claim before the work and the done mark after it keeps that order. redis-py's asyncio client
has no auto-pipelining of its own.

A command that fails (a script Redis does not know, a wrong type) fails alone; a connection
that fails fails every command of its batch, as it would have failed each of them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis

#: Commands per pipeline at most; more wait for the next one.
MAX_BATCH = 256

#: One queued command: its arguments, its reply-parsing options, and who waits for the reply.
_Command = tuple[tuple[Any, ...], dict[str, Any], "asyncio.Future[Any]"]


class CommandBatcher:
    """Coalesces concurrent Redis commands into pipelines (see the module docstring)."""

    def __init__(self, redis: Redis, *, max_batch: int = MAX_BATCH) -> None:
        self.redis = redis
        self.max_batch = max_batch
        self._pending: list[_Command] = []
        self._scheduled = False
        self._sending: set[asyncio.Task[None]] = set()

    async def execute(self, *args: Any, **options: Any) -> Any:
        """Run one command (``"SET", key, value, "NX"``…) in the next batch; its reply.

        ``options`` go to redis-py's reply parsing, as for ``Redis.execute_command`` (``SET``
        with ``GET`` needs ``get=True``).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((args, options, future))
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
        live = [command for command in batch if not command[2].done()]
        if not live:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for args, options, _ in live:
                    pipe.execute_command(*args, **options)
                replies = await pipe.execute(raise_on_error=False)
        except BaseException as exc:  # the connection failed: every command of the batch did
            for _, _, future in live:
                _fail(future, _copy(exc))
            if not isinstance(exc, Exception):
                raise
            return
        for (_, _, future), reply in zip(live, replies, strict=True):
            if isinstance(reply, Exception):
                _fail(future, reply)
            elif not future.done():  # the caller may have been cancelled meanwhile
                future.set_result(reply)


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
