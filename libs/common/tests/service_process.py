"""A Courier service made with ``service_app`` and nothing else, run as a process by
test_service.py: its topology is the platform's alone, so a queue in the way stops it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from courier_common.messaging import Topology
from courier_common.metrics import service_registry
from courier_common.service import Parts, Resources, run_service, service_app
from courier_common.settings import CourierSettings


@asynccontextmanager
async def build(_resources: Resources) -> AsyncIterator[Parts]:
    yield Parts(topology=Topology(work_queues=()))


def main() -> None:
    settings = CourierSettings()
    run_service(
        "kit-test",
        settings,
        lambda: service_app(
            "kit-test", settings, title="kit test", registry=service_registry(), build=build
        ),
    )


if __name__ == "__main__":
    main()
