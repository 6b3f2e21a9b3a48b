"""Acks of one loop turn go out together: one ``basic.ack(multiple)`` where that is safe.

A consumer at prefetch 100 acks up to 100 deliveries for every batch of Redis replies, each ack
a frame of its own and a ``send`` of its own. :class:`AckBatcher` collects the acks decided in
one turn of the event loop, per channel, and sends them at the end of it: the run of them that
covers *every* delivery the channel still holds up to some tag goes as one ``basic.ack`` with
``multiple=True`` for that tag; any other is acked on its own, at once.

``multiple`` acks everything up to the tag that the channel has delivered and not settled, so
it must never cover a delivery still being handled, or one about to be rejected or requeued: a
crash would then lose it. The batcher therefore tracks every delivery of the channel from its
arrival (:meth:`AckBatcher.delivered`) until it is settled, and only covers tags that are all
ready to ack. Delivery tags of a channel run 1, 2, 3, …; if the ones it saw do not (a delivery
it was never told of), it never uses ``multiple`` on that channel again.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, field
from typing import Any

from courier_common.logging import get_logger

log = get_logger(__name__)


@dataclass(eq=False)
class _Channel:
    """What one AMQP channel has delivered and not settled, and which of it is ready."""

    channel: Any  # aiormq's channel: basic_ack(delivery_tag, multiple=...)
    open: set[int] = field(default_factory=set)
    ready: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    seen_max: int = 0
    seen_count: int = 0

    @property
    def contiguous(self) -> bool:
        return self.seen_count == self.seen_max


class AckBatcher:
    """Per-loop-turn ack coalescing for the channels of one consumer."""

    def __init__(self) -> None:
        self._channels: dict[int, _Channel] = {}
        self._scheduled = False
        self._sending: set[asyncio.Task[None]] = set()

    def delivered(self, channel: Any, tag: int) -> None:
        """A delivery arrived on ``channel``: it is held until acked or :meth:`released`."""
        state = self._channels.get(id(channel))
        if state is None or state.channel is not channel:
            for key, old in list(self._channels.items()):  # channels a reconnect replaced
                if getattr(old.channel, "is_closed", False):
                    del self._channels[key]
            state = self._channels[id(channel)] = _Channel(channel)
        state.open.add(tag)
        state.seen_count += 1
        state.seen_max = max(state.seen_max, tag)

    def released(self, channel: Any, tag: int) -> None:
        """The delivery was rejected, requeued or abandoned: it no longer blocks a run."""
        state = self._channels.get(id(channel))
        if state is not None and state.channel is channel:
            state.open.discard(tag)
            state.ready.pop(tag, None)

    async def ack(self, channel: Any, tag: int) -> None:
        """Ack at the end of this loop turn; returns once the ack frame is written."""
        state = self._channels.get(id(channel))
        if state is None or state.channel is not channel:  # never told of it: ack it alone
            await channel.basic_ack(delivery_tag=tag)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state.ready[tag] = future
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        await future

    def _flush(self) -> None:
        """Send what this turn made ready: one ``multiple`` run per channel, then singles.

        Every ack frame is sent by a task created here, in order; each task queues its frame
        at its first step, so frames go out in the order of creation, and a later turn's
        ``multiple`` ack can never overtake the single ack of a tag below it.
        """
        self._scheduled = False
        loop = asyncio.get_running_loop()
        for state in list(self._channels.values()):
            if not state.ready:
                continue
            ready, state.ready = state.ready, {}
            run: list[int] = []
            if state.contiguous and len(ready) > 1:
                for tag in sorted(state.open):
                    if tag not in ready:
                        break
                    run.append(tag)
            if len(run) < 2:
                run = []
            covered = set(run)
            state.open.difference_update(ready)
            sends: list[tuple[list[int], Any]] = []
            if run:
                sends.append((run, state.channel.basic_ack(delivery_tag=run[-1], multiple=True)))
            sends += [
                ([tag], state.channel.basic_ack(delivery_tag=tag))
                for tag in sorted(ready)
                if tag not in covered
            ]
            for tags, send in sends:
                task = loop.create_task(send)
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)
                task.add_done_callback(functools.partial(_settle, tags, ready, state))


def _settle(
    tags: list[int],
    ready: dict[int, asyncio.Future[None]],
    state: _Channel,
    done: asyncio.Task[Any],
) -> None:
    error = done.exception() if not done.cancelled() else asyncio.CancelledError()
    if error is not None:
        state.seen_count = -1  # something went wrong on this channel: no more runs on it
    for tag in tags:
        future = ready[tag]
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(None)
