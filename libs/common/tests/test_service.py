"""The service kit: a Courier service's life from start to drain, and how it ends on a fault."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from asgi_lifespan import LifespanManager

from courier_common.messaging import AmqpConnection, Topology
from courier_common.metrics import service_registry
from courier_common.service import Parts, Resources, service_app
from courier_common.settings import CourierSettings
from courier_testing.polling import eventually

SERVICE_PROCESS = Path(__file__).with_name("service_process.py")


async def test_a_topology_mismatch_ends_the_process_with_one_critical_line(
    amqp_url: str, redis_url: str, connection: AmqpConnection
) -> None:
    channel = await connection.channel()
    await channel.declare_queue("courier.dead-letters", durable=True)  # classic: in the way
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-P", str(SERVICE_PROCESS)],  # -P: its folder would shadow http
        env={
            **os.environ,
            "COURIER_AMQP_URL": amqp_url,
            "COURIER_REDIS_URL": redis_url,
            "COURIER_HTTP_PORT": "0",
            "COURIER_LOG_FORMAT": "json",
        },
        capture_output=True,
        timeout=60,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith(b"{")]
    critical = [line for line in lines if line["level"] == "critical"]
    assert [line["event"] for line in critical] == ["topology_mismatch"], proc.stdout
    assert "'courier.dead-letters'" in critical[0]["error"]
    assert "Application shutdown complete." in [line["event"] for line in lines]  # drained
    assert proc.returncode == 1
    assert b"Traceback" not in proc.stderr, proc.stderr.decode()


class Flaky:
    """A loop that crashes on its first run and then runs until told to stop."""

    def __init__(self) -> None:
        self.runs = 0
        self.stopped = asyncio.Event()

    async def run(self) -> None:
        self.runs += 1
        if self.runs == 1:
            raise RuntimeError("first run crashes")
        await self.stopped.wait()

    def stop(self) -> None:
        self.stopped.set()


async def test_workers_start_report_and_drain_and_a_crashed_loop_is_restarted(
    amqp_url: str, redis_url: str
) -> None:
    settings = CourierSettings(amqp_url=amqp_url, redis_url=redis_url, environment="test")
    flaky = Flaky()
    closed: list[str] = []

    @asynccontextmanager
    async def build(resources: Resources) -> AsyncIterator[Parts]:
        try:
            yield Parts(
                workers=[resources.background("flaky", flaky.run, on_stop=flaky.stop)],
                topology=Topology(work_queues=()),
                state={"answer": 42},
                report=lambda: {"runs": flaky.runs},
            )
        finally:
            closed.append("build")  # what build opened closes after the workers stopped
            assert flaky.stopped.is_set()

    app = service_app(
        "kit-test", settings, title="kit test", registry=service_registry(), build=build
    )
    async with (
        LifespanManager(app, startup_timeout=30) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://kit"
        ) as client,
    ):
        assert app.state.answer == 42

        async def ready() -> bool:
            response = await client.get("/readyz")
            return response.status_code == 200

        await eventually(ready, timeout=30, what="the service ready")
        body = (await client.get("/readyz")).json()
        assert body["consuming"] is True
        assert body["redis"] == "ok"
        await eventually(lambda: flaky.runs == 2, timeout=10, what="the crashed loop restarted")
        assert (await client.get("/readyz")).json()["runs"] == 2
        problem = await client.get("/nowhere")
        assert problem.status_code == 404
        assert problem.headers["content-type"] == "application/problem+json"
    assert closed == ["build"]
