"""courier_common.redis: Sentinel settings, the Sentinel pool through a failover, WAIT.

The Sentinel tests run a private primary, replica and three Sentinels (tests/support/
sentinel.py); one group serves the module and every test starts by waiting until it is
settled again (a failover test leaves it with the roles swapped).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.exceptions
from pydantic import ValidationError

from courier_common.redis import (
    Durability,
    NotReplicatedError,
    RedisTarget,
    connect,
    is_unavailable,
    parse_sentinels,
)
from courier_common.settings import CourierSettings
from courier_testing.private_services import PrivateRedis
from courier_testing.sentinel import SERVICE, RedisSentinelGroup

# --- settings and parsing (no server) -----------------------------------------------------


def test_sentinel_addresses_parse_and_normalise() -> None:
    assert parse_sentinels("a:1, b.example:26379,[::1]:5") == (
        ("a", 1),
        ("b.example", 26379),
        ("::1", 5),
    )
    settings = CourierSettings(
        redis_sentinels=" s1:26379 ,[::1]:26380", redis_sentinel_service="courier"
    )
    assert settings.redis_sentinels == "s1:26379,[::1]:26380"
    target = settings.redis_target()
    assert target.sentinels == (("s1", 26379), ("::1", 26380))
    assert target.service == "courier"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("a", "'a' is not host:port"),
        ("a:0", "port 1-65535"),
        ("a:70000", "port 1-65535"),
        ("a:1,,b:2", "an empty entry"),
        ("a:1,a:1", "listed twice"),
        ("::1:26379", r"\[address\]:port"),
    ],
)
def test_bad_sentinel_addresses_are_refused_clearly(value: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        CourierSettings(redis_sentinels=value, redis_sentinel_service="courier")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"redis_sentinels": "a:1"}, "go together"),
        ({"redis_sentinel_service": "courier"}, "go together"),
        (
            {
                "redis_sentinels": "a:1",
                "redis_sentinel_service": "courier",
                "redis_url": "unix:///run/redis.sock",
            },
            "unix socket",
        ),
        ({"redis_replica_timeout_ms": 0}, "greater than or equal to 1"),
        ({"redis_replica_timeout_ms": 60_000}, "less than or equal to 5000"),
        ({"redis_min_replicas": -1}, "greater than or equal to 0"),
    ],
)
def test_inconsistent_redis_settings_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        CourierSettings.model_validate(fields)


def test_production_refuses_a_placeholder_sentinel_password() -> None:
    real = {
        "environment": "production",
        "amqp_url": "amqp://courier:Xy7-long-random@rabbitmq:5672/",
        "redis_url": "redis://:An0ther-secret@redis:6379/0",
        "redis_sentinels": "sentinel:26379",
        "redis_sentinel_service": "courier",
    }
    with pytest.raises(ValidationError, match="COURIER_REDIS_SENTINEL_PASSWORD is a placeholder"):
        CourierSettings.model_validate({**real, "redis_sentinel_password": "changeme"})
    settings = CourierSettings.model_validate({**real, "redis_sentinel_password": "S3nt-inel"})
    assert settings.redis_target().sentinel_password == "S3nt-inel"
    assert "S3nt-inel" not in repr(settings)


def test_min_replicas_defaults_to_one_behind_sentinel_and_zero_without() -> None:
    alone = CourierSettings()
    assert alone.redis_replicas_required == 0
    assert not alone.redis_durability().enabled
    behind = CourierSettings(redis_sentinels="s:26379", redis_sentinel_service="courier")
    assert behind.redis_replicas_required == 1
    durability = behind.redis_durability()
    assert (durability.min_replicas, durability.timeout_ms) == (1, 1000)
    assert durability.fence_key == "courier:replication-fence"
    explicit = CourierSettings(
        redis_sentinels="s:26379", redis_sentinel_service="courier", redis_min_replicas=0
    )
    assert explicit.redis_replicas_required == 0
    assert CourierSettings(redis_min_replicas=2).redis_replicas_required == 2


def test_a_target_needs_both_sentinels_and_a_master_name() -> None:
    with pytest.raises(ValueError, match="go together"):
        RedisTarget(url="redis://x/0", sentinels=(("s", 1),))


def test_durability_refuses_a_wait_that_blocks_forever() -> None:
    with pytest.raises(ValueError, match="block for ever"):
        Durability(min_replicas=1, timeout_ms=0)


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (redis.exceptions.ConnectionError("gone"), True),
        (redis.exceptions.TimeoutError("slow"), True),
        (redis.exceptions.BusyLoadingError("loading"), True),
        (NotReplicatedError(0, 1, 100), True),
        (redis.exceptions.ReadOnlyError("You can't write against a read only replica."), True),
        (redis.exceptions.NoScriptError("No matching script."), True),
        (redis.exceptions.ResponseError("NOREPLICAS Not enough good replicas to write."), True),
        (redis.exceptions.ResponseError("MASTERDOWN Link with MASTER is down"), True),
        (redis.exceptions.ResponseError("UNBLOCKED force unblock from blocking operation"), True),
        (redis.exceptions.ResponseError("WRONGTYPE Operation against a key"), False),
        (redis.exceptions.ResponseError("ERR Error running script"), False),
        (redis.exceptions.DataError("bad"), False),
        (ValueError("not redis"), False),
    ],
)
def test_what_counts_as_redis_being_unavailable(error: Exception, unavailable: bool) -> None:
    assert is_unavailable(error) is unavailable


# --- against a private Sentinel group -----------------------------------------------------


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinelGroup]:
    with RedisSentinelGroup(tmp_path_factory.mktemp("sentinel")) as started:
        yield started


@pytest.fixture
def settled(group: RedisSentinelGroup) -> RedisSentinelGroup:
    group.wait_settled()
    return group


def _target(group: RedisSentinelGroup) -> RedisTarget:
    # The URL points nowhere: only the Sentinels may say where the primary is.
    return RedisTarget(
        url="redis://127.0.0.1:1/0",
        sentinels=parse_sentinels(group.sentinel_addresses),
        service=SERVICE,
    )


def _unnamed_clients(port: int) -> int:
    """Plain client connections on a node, apart from the Sentinels' and this probe's own."""
    probe = redis.Redis(port=port, socket_timeout=5, client_name="test-probe")
    try:
        clients = probe.client_list(_type="normal")
    finally:
        probe.close()
    return sum(1 for c in clients if not c.get("name"))


@pytest.mark.fault
async def test_the_client_finds_the_primary_through_the_sentinels(
    settled: RedisSentinelGroup,
) -> None:
    client = connect(_target(settled), max_connections=4)
    try:
        assert await client.set("t:where", "primary")
        info = await client.info("replication")
        assert info["role"] == "master"
        server = await client.info("server")
        assert int(server["tcp_port"]) == settled.primary().port
    finally:
        await client.aclose()


@pytest.mark.fault
async def test_a_confirmed_write_reaches_the_replica(settled: RedisSentinelGroup) -> None:
    client = connect(_target(settled), max_connections=4)
    durability = Durability(min_replicas=1, timeout_ms=2000, fence_key="t:fence")
    script = client.register_script("return redis.call('SET', KEYS[1], ARGV[1])")
    try:
        assert await durability.script(client, script, keys=["t:confirmed"], args=["1"]) == b"OK"
        replica = settled.replicas()[0]
        # WAIT returned: the replica has it now, not "soon".
        assert redis.Redis(port=replica.port).get("t:confirmed") == b"1"
    finally:
        await client.aclose()


@pytest.mark.fault
async def test_an_unconfirmed_write_is_not_replicated_but_applied(
    settled: RedisSentinelGroup,
) -> None:
    client = connect(_target(settled), max_connections=4)
    durability = Durability(min_replicas=1, timeout_ms=200, fence_key="t:fence")
    replica = settled.replicas()[0]
    replica.pause()
    try:
        with pytest.raises(NotReplicatedError) as caught:
            await durability.commands(client, lambda pipe: pipe.set("t:doubt", "1"))
        assert (caught.value.confirmed, caught.value.required) == (0, 1)
        assert is_unavailable(caught.value)
        # In doubt, not refused: the primary applied it.
        assert await client.get("t:doubt") == b"1"
        # A plain write now, then a read through Durability on a fresh connection: the fence
        # makes WAIT cover what the read found, so it is refused too.
        other = redis.Redis(port=settled.primary().port)
        other.set("t:found", "1")
        other.close()
        with pytest.raises(NotReplicatedError):
            await durability.commands(client, lambda pipe: pipe.get("t:found"))
    finally:
        replica.resume()
        await client.aclose()


@pytest.mark.fault
async def test_no_fence_and_no_wait_without_replicas_required(tmp_path: Path) -> None:
    with PrivateRedis(tmp_path) as server:
        client = connect(server.url, max_connections=2)
        try:
            script = client.register_script("return redis.call('INCR', KEYS[1])")
            durability = Durability(min_replicas=0, fence_key="t:fence")
            assert await durability.script(client, script, keys=["t:n"], args=[]) == 1
            assert await durability.commands(client, lambda pipe: pipe.get("t:n")) == [b"1"]
            assert await client.exists("t:fence") == 0
            # A single node with replicas required: WAIT answers 0, never a silent yes.
            with pytest.raises(NotReplicatedError):
                await Durability(1, 50, "t:fence").commands(client, lambda p: p.get("t:n"))
        finally:
            await client.aclose()


@pytest.mark.fault
async def test_a_confirmed_script_reloads_after_the_cache_is_emptied(
    settled: RedisSentinelGroup,
) -> None:
    client = connect(_target(settled), max_connections=4)
    script = client.register_script("return redis.call('INCR', KEYS[1])")
    durability = Durability(min_replicas=1, timeout_ms=2000, fence_key="t:fence")
    try:
        first = await durability.script(client, script, keys=["t:reload"], args=[])
        redis.Redis(port=settled.primary().port).script_flush()
        # NOSCRIPT means nothing ran: loaded and sent once more, so exactly one increment.
        assert await durability.script(client, script, keys=["t:reload"], args=[]) == first + 1
    finally:
        await client.aclose()


@pytest.mark.fault
async def test_closing_the_client_closes_the_sentinel_connections(
    settled: RedisSentinelGroup,
) -> None:
    client = connect(_target(settled), max_connections=2)
    await client.ping()
    pool = client.connection_pool
    sentinels = pool.sentinel_manager.sentinels  # type: ignore[attr-defined]
    assert any(s.connection_pool._available_connections for s in sentinels)
    await client.aclose()
    for sentinel in sentinels:
        assert all(not c.is_connected for c in sentinel.connection_pool._available_connections)


@pytest.mark.fault
async def test_after_a_failover_every_connection_moves_and_scripts_reload(
    settled: RedisSentinelGroup,
) -> None:
    """Last in the module: the group is left with its roles swapped."""
    client = connect(_target(settled), max_connections=8)
    script = client.register_script("return redis.call('INCR', KEYS[1])")
    try:
        # Eight connections in the pool, all to the first primary.
        await asyncio.gather(*(client.incr("t:count") for _ in range(8)))
        assert await script(keys=["t:scripted"]) == 1
        old = settled.primary()
        assert _unnamed_clients(old.port) == 8
        settled.failover()
        new = settled.wait_promoted(old)
        # Lua scripts are not replicated: the new primary does not know this one.
        assert redis.Redis(port=new.port).script_exists(script.sha) == [False]
        # The old primary still serves (it is reconfigured seconds later): reading through
        # a stale connection would not fail, it would read the wrong node. The pool asks the
        # Sentinels again within SENTINEL_CHECK_SECONDS and leaves it.
        await asyncio.sleep(0.6)
        counts = await asyncio.gather(*(client.incr("t:count") for _ in range(8)))
        assert sorted(counts) == list(range(9, 17)), "every increment on the new primary"
        server = await client.info("server")
        assert int(server["tcp_port"]) == new.port
        assert _unnamed_clients(old.port) == 0, "connections to the old primary were closed"
        assert await script(keys=["t:scripted"]) == 2  # NOSCRIPT, loaded, run once
        redis.Redis(port=new.port).script_flush()
        pipeline = Durability(0, fence_key="t:fence")
        assert await pipeline.script(client, script, keys=["t:scripted"], args=[]) == 3
    finally:
        await client.aclose()
