"""Retention trimming and the archive's gauges, in the background of the archiver."""

from __future__ import annotations

import asyncio

from courier_common.logging import get_logger
from courier_common.tasks import pause
from dlq_archiver.archiving import ArchiveConsumer
from dlq_archiver.config import Settings
from dlq_archiver.store import Archive

log = get_logger(__name__)


class Housekeeping:
    """Trims the archive to its retention and refreshes the gauges, until :meth:`stop`.

    A failed round (Redis away) is logged and tried again at the next interval: neither job
    is urgent, and both catch up.
    """

    def __init__(self, settings: Settings, archive: Archive, consumer: ArchiveConsumer) -> None:
        self.settings = settings
        self.archive = archive
        self.consumer = consumer
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        next_trim = 0.0
        while not self._stopping.is_set():
            try:
                if loop.time() >= next_trim:
                    await self.trim()
                    next_trim = loop.time() + settings.retention_interval_seconds
                await self.consumer.update_gauges(settings.top_groups_metric)
            except Exception:
                log.exception("housekeeping_failed")
            await pause(self._stopping, settings.gauges_interval_seconds)

    async def trim(self) -> int:
        """Remove what is past the retention (age or count); audited when anything went."""
        settings = self.settings
        removed = await self.archive.trim(
            max_age_seconds=(
                settings.retention_max_age_days * 86400 if settings.retention_max_age_days else None
            ),
            max_count=settings.retention_max_count,
        )
        if removed:
            await self.archive.audit("retention", what={}, count=removed)
            log.info("dead_letters_trimmed", count=removed)
        return removed
