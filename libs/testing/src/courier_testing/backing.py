"""The shared RabbitMQ and Redis that tests and the benchmark stand on.

Where they are (``COURIER_TEST_*`` override the defaults), a vhost of one's own on the broker
through its management API, and the removal of a key prefix of one's own in Redis. Nobody
touches anything else on them: everything is created under a name that says whose it is, and
removed afterwards.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import quote

import httpx
import pytest
import redis

AMQP_HOST = os.environ.get("COURIER_TEST_AMQP_HOST", "127.0.0.1")
AMQP_PORT = int(os.environ.get("COURIER_TEST_AMQP_PORT", "5672"))
MANAGEMENT_URL = os.environ.get("COURIER_TEST_MANAGEMENT_URL", f"http://{AMQP_HOST}:15672")
REDIS_URL = os.environ.get("COURIER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
USER, PASSWORD = "guest", "guest"


@dataclass(frozen=True)
class BrokerVhost:
    """A vhost on the shared broker (or another broker, see `BrokerAdmin`) for one test."""

    name: str
    amqp_host: str = AMQP_HOST
    amqp_port: int = AMQP_PORT
    management: str = MANAGEMENT_URL

    @property
    def amqp_url(self) -> str:
        vhost = quote(self.name, safe="")
        return f"amqp://{USER}:{PASSWORD}@{self.amqp_host}:{self.amqp_port}/{vhost}"

    @property
    def management_url(self) -> str:
        return self.management.replace("://", f"://{USER}:{PASSWORD}@", 1)


class BrokerAdmin:
    """Management API calls the tests and the benchmark need (synchronous).

    The shared broker's by default; *management_url* and *amqp_port* point it at another
    (the RabbitMQ 4 node of the V4 runs).
    """

    def __init__(
        self,
        management_url: str = MANAGEMENT_URL,
        *,
        amqp_host: str = AMQP_HOST,
        amqp_port: int = AMQP_PORT,
        release: str = "3.10",
    ) -> None:
        self.management_url = management_url
        self.amqp_host = amqp_host
        self.amqp_port = amqp_port
        self.release = release
        self.client = httpx.Client(base_url=management_url, auth=(USER, PASSWORD), timeout=30)

    def vhost(self, name: str) -> BrokerVhost:
        """A handle on vhost *name* of this broker (not created here)."""
        return BrokerVhost(name, self.amqp_host, self.amqp_port, self.management_url)

    def check(self) -> None:
        """Fail the test, naming what to do, when the management API does not answer."""
        try:
            self.client.get("/api/overview").raise_for_status()
        except httpx.HTTPError as exc:
            pytest.fail(
                f"RabbitMQ management API is not reachable at {self.management_url} "
                f"({exc!r}). "
                "Run `make test` (it starts RabbitMQ and enables rabbitmq_management), or "
                "`rabbitmq-plugins enable rabbitmq_management rabbitmq_prometheus`.",
                pytrace=False,
            )

    def create_vhost(self, name: str) -> None:
        vhost = quote(name, safe="")
        self.client.put(f"/api/vhosts/{vhost}").raise_for_status()
        self.client.put(
            f"/api/permissions/{vhost}/{USER}",
            json={"configure": ".*", "write": ".*", "read": ".*"},
        ).raise_for_status()

    def delete_vhost(self, name: str) -> None:
        response = self.client.delete(f"/api/vhosts/{quote(name, safe='')}")
        if response.status_code not in (204, 404):
            response.raise_for_status()

    def vhosts(self) -> list[str]:
        return [v["name"] for v in self.client.get("/api/vhosts").json()]

    def queue(self, vhost: str, name: str) -> dict[str, object]:
        response = self.client.get(f"/api/queues/{quote(vhost, safe='')}/{quote(name, safe='')}")
        response.raise_for_status()
        result: dict[str, object] = response.json()
        return result

    def queues(self, vhost: str) -> list[dict[str, object]]:
        response = self.client.get(f"/api/queues/{quote(vhost, safe='')}")
        response.raise_for_status()
        result: list[dict[str, object]] = response.json()
        return result

    def purge(self, vhost: str, queue: str) -> None:
        """Drop every ready message of *queue* (a queue that does not exist is fine)."""
        url = f"/api/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}/contents"
        response = self.client.delete(url)
        if response.status_code not in (204, 404):
            response.raise_for_status()

    def sweep_stale(self, prefix: str) -> None:
        """Delete the vhosts named ``<prefix><pid>-<6 hex>…`` (a run's id) whose creating
        process is gone (a crashed earlier run). Other names under *prefix* are not a run's:
        a test that names a vhost of its own after an object id removes it itself."""
        run = re.compile(rf"{re.escape(prefix)}(\d+)-[0-9a-f]{{6}}(?:-|$)")
        for name in self.vhosts():
            found = run.match(name)
            if found and not alive(int(found[1])):
                self.delete_vhost(name)

    def close(self) -> None:
        self.client.close()


def alive(pid: int) -> bool:
    """Does a process with this pid exist (as far as this user can tell)?"""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or no pid at all
        return False
    except PermissionError:
        return True
    return True


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    """Delete every key under *prefix*, a thousand at a time (a benchmark leaves millions)."""
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            client.delete(*batch)
            batch.clear()
    if batch:
        client.delete(*batch)
