"""Queue depth as the broker sees it, polled into ``courier_queue_messages``.

Ready and unacked counts come from the management API (AMQP's passive declare reports only
ready messages, and unacked ones are backlog too: they are what a dead worker leaves behind).
Every node of a cluster serves the whole cluster's queue stats, so with several management
URLs (one per node) the client asks one and moves on to the next only when that one fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx

from courier_common.logging import get_logger
from courier_common.messaging.topology import DEAD_LETTER_QUEUE, WorkQueue
from courier_common.metrics import MessagingMetrics
from courier_common.tasks import cancel_and_wait

if TYPE_CHECKING:  # settings import the messaging package, which imports this module
    from courier_common.settings import ConsumerSettings

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class QueueDepth:
    name: str
    ready: int
    unacked: int
    consumers: int


def _split_credentials(url: str) -> tuple[str, httpx.BasicAuth | None]:
    parts = urlsplit(url)
    if parts.username is None:
        return url, None
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    bare = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    return bare, httpx.BasicAuth(unquote(parts.username), unquote(parts.password or ""))


class ManagementClient:
    """The few RabbitMQ management API calls Courier needs, from the first node that answers.

    *base_urls* is one URL, a comma-separated list or a sequence (one per node). The node that
    answered last is asked first; a transport error or a 5xx moves on to the next node, and
    the call fails only when every node failed (with the last node's error).
    """

    def __init__(self, base_urls: str | Sequence[str], *, timeout: float = 5.0) -> None:
        parts = base_urls.split(",") if isinstance(base_urls, str) else list(base_urls)
        urls = [part.strip().rstrip("/") for part in parts if part.strip()]
        if not urls:
            raise ValueError("ManagementClient needs at least one management API URL")
        self._clients: list[httpx.AsyncClient] = []
        for url in urls:
            bare, auth = _split_credentials(url)
            self._clients.append(httpx.AsyncClient(base_url=bare, auth=auth, timeout=timeout))
        self._current = 0

    @property
    def base_url(self) -> str:
        """The node asked first (no credentials)."""
        return str(self._clients[self._current].base_url)

    async def _get(self, path: str, params: dict[str, str]) -> httpx.Response:
        error: Exception | None = None
        for step in range(len(self._clients)):
            index = (self._current + step) % len(self._clients)
            try:
                response = await self._clients[index].get(path, params=params)
                if response.status_code < 500:
                    response.raise_for_status()
                    self._current = index
                    return response
                response.raise_for_status()
            except (httpx.TransportError, httpx.HTTPStatusError) as exc:
                if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code < 500:
                    raise  # the node answered: 401/404 is the same on every node
                error = exc
        assert error is not None
        raise error

    async def queue_depth(self, vhost: str, queue: str) -> QueueDepth:
        response = await self._get(
            f"/api/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}",
            params={"columns": "name,messages_ready,messages_unacknowledged,consumers"},
        )
        body = response.json()
        return QueueDepth(
            name=queue,
            ready=int(body.get("messages_ready") or 0),
            unacked=int(body.get("messages_unacknowledged") or 0),
            consumers=int(body.get("consumers") or 0),
        )

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()


class BacklogMonitor:
    """Polls the depth of some queues every ``interval`` seconds into the backlog gauges."""

    def __init__(
        self,
        client: ManagementClient,
        *,
        vhost: str,
        queues: Sequence[str],
        metrics: MessagingMetrics,
        interval: float = 5.0,
    ) -> None:
        self.client = client
        self.vhost = vhost
        self.queues = tuple(queues)
        self.metrics = metrics
        metrics.use_backlog()
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._warned = False

    @classmethod
    def for_work_queue(
        cls, settings: ConsumerSettings, queue: WorkQueue, metrics: MessagingMetrics
    ) -> BacklogMonitor:
        """What a consumer of ``queue`` reports: its depth, its retry tiers', the dead letters'."""
        return cls(
            ManagementClient(settings.management_urls),
            vhost=settings.amqp_vhost,
            queues=[queue.name, *queue.retry_queue_names, DEAD_LETTER_QUEUE],
            metrics=metrics,
            interval=settings.backlog_poll_seconds,
        )

    async def poll_once(self) -> list[QueueDepth]:
        depths: list[QueueDepth] = []
        for name in self.queues:
            depth = await self.client.queue_depth(self.vhost, name)
            self.metrics.queue_messages.labels(name, "ready").set(depth.ready)
            self.metrics.queue_messages.labels(name, "unacked").set(depth.unacked)
            self.metrics.queue_consumers.labels(name).set(depth.consumers)
            depths.append(depth)
        return depths

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
                self._warned = False
            except (httpx.HTTPError, ValueError) as exc:
                if not self._warned:  # one line per outage, not one per poll
                    log.warning("backlog_poll_failed", error=repr(exc))
                    self._warned = True
            await asyncio.sleep(self.interval)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="courier-backlog-monitor")

    async def stop(self, timeout: float = 2.0) -> None:
        """Stop polling (a poll in progress is cancelled: it holds nothing) and close."""
        if self._task is not None:
            await cancel_and_wait([self._task], timeout=timeout)
            self._task = None
        await self.client.aclose()
