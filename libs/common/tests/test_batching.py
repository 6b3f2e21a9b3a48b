"""CommandBatcher: concurrent Redis commands share one round trip, and each caller gets its own."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from courier_common.batching import CommandBatcher
from courier_testing.backing import REDIS_URL


@pytest.fixture
async def client() -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


async def test_commands_of_one_turn_share_one_write_and_get_their_own_replies(
    client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    batcher = CommandBatcher(client)
    writes = 0
    connection_class = client.connection_pool.connection_class
    send = connection_class.send_packed_command

    async def counting(self: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal writes
        writes += 1
        await send(self, *args, **kwargs)

    key = f"{redis_prefix}batch"
    assert await batcher.execute("PING") == b"PONG"  # the pool's connection is up and greeted
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(connection_class, "send_packed_command", counting)
        replies = await asyncio.gather(
            batcher.execute("SET", key, "a", "NX", "GET"),
            batcher.execute("SET", key, "b", "NX", "GET"),
            batcher.execute("INCR", f"{redis_prefix}counter"),
            batcher.execute("GET", key),
        )
    assert writes == 1
    assert list(replies) == [None, b"a", 1, b"a"]  # raw replies, in the order they were asked


async def test_an_error_reply_fails_its_own_command_alone(
    client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    batcher = CommandBatcher(client)
    key = f"{redis_prefix}list"
    await client.rpush(key, "x")
    results = await asyncio.gather(
        batcher.execute("GET", key),  # WRONGTYPE
        batcher.execute("EVALSHA", "0" * 40, 0),  # NOSCRIPT
        batcher.execute("LLEN", key),
        return_exceptions=True,
    )
    assert isinstance(results[0], ResponseError)
    assert "WRONGTYPE" in str(results[0])
    assert isinstance(results[1], NoScriptError)  # what the idempotency store reloads on
    assert results[2] == 1
    assert await batcher.execute("PING") == b"PONG"  # the connection is still good


async def test_a_dead_server_fails_every_command_of_the_batch() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = redis.asyncio.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    batcher = CommandBatcher(client)
    try:
        results = await asyncio.gather(
            *(batcher.execute("PING") for _ in range(3)), return_exceptions=True
        )
    finally:
        await client.aclose()
    assert all(isinstance(result, RedisConnectionError) for result in results), results
    assert len({id(result) for result in results}) == 3  # one exception each


async def test_a_cancelled_caller_does_not_take_the_others_down(
    client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    batcher = CommandBatcher(client)
    key = f"{redis_prefix}cancel"
    cancelled = asyncio.create_task(batcher.execute("SET", key, "1"))
    kept = asyncio.create_task(batcher.execute("INCR", f"{redis_prefix}kept"))
    await asyncio.sleep(0)  # both queued, the batch not yet sent
    cancelled.cancel()
    assert await kept == 1
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert await client.get(key) is None  # a command cancelled before its batch left never ran
