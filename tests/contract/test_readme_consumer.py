"""The README's "new consumer" example runs as written: its queue is bound to courier.events and
it gets what user-service publishes."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any
from uuid import uuid4

from courier_common.events import USER_SERVICE_SOURCE, UserRegistered
from courier_common.messaging import (
    AmqpConnection,
    OutgoingMessage,
    Publisher,
    Topology,
    declare_topology,
    new_event,
)
from courier_testing.backing import BrokerAdmin, BrokerVhost

README = Path(__file__).resolve().parents[2] / "README.md"
HANDLER_BODY = '    print("registered:", event.id)'


def readme_example() -> str:
    section = README.read_text().split("### The event contract", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "the README's event-contract section has no Python example"
    code = match.group(1)
    assert HANDLER_BODY in code, "the example's handler changed: update this test"
    assert '"amqp://guest:guest@127.0.0.1:5672/"' in code
    return code


async def test_the_readme_consumer_binds_its_queue_and_receives_events(
    vhost: BrokerVhost, broker_admin: BrokerAdmin
) -> None:
    code = readme_example()
    code = code.replace("amqp://guest:guest@127.0.0.1:5672/", vhost.amqp_url)
    code = code.replace(HANDLER_BODY, "    RECEIVED.append(event)\n    ARRIVED.set()")
    arrived = asyncio.Event()
    namespace: dict[str, Any] = {"RECEIVED": [], "ARRIVED": arrived}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102  # our own README
    runner = await namespace["start"]()
    connection = await AmqpConnection(vhost.amqp_url, client_name="readme-test").connect()
    try:
        bindings = broker_admin.client.get(
            f"/api/queues/{vhost.name}/crm.user-events/bindings"
        ).json()
        assert {(b["source"], b["routing_key"]) for b in bindings} >= {
            ("courier.events", "user.registered")
        }
        channel = await connection.channel()
        await declare_topology(channel, Topology())
        data = UserRegistered(
            user_id=uuid4(),
            email="ada@example.com",
            display_name="Ada",
            locale="en",
            channels=("email",),
        )
        event = new_event(data, source=USER_SERVICE_SOURCE)
        await Publisher(channel).publish(OutgoingMessage.for_event(event))
        await asyncio.wait_for(arrived.wait(), 20)
        assert namespace["RECEIVED"][0].id == event.id
    finally:
        await runner.stop(timeout=10)
        await runner.loop.connection.close()
        await connection.close()
