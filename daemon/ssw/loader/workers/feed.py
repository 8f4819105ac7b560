"""The loader's news: every change to the worker table or the load book bumps
``seq`` and wakes each subscriber (the gateway's event stream), which then sends
the latest snapshot. ``epoch`` changes with every loader start, so a client tells
a restarted loader (whose ``seq`` starts again) from a quiet one."""

from __future__ import annotations

import asyncio
import contextlib
import uuid


class Feed:
    def __init__(self) -> None:
        self.epoch = uuid.uuid4().hex
        self.seq = 0
        self._subscribers: set[asyncio.Queue[None]] = set()

    def subscribe(self) -> asyncio.Queue[None]:
        queue: asyncio.Queue[None] = asyncio.Queue(maxsize=1)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[None]) -> None:
        self._subscribers.discard(queue)

    def changed(self) -> None:
        self.seq += 1
        for queue in self._subscribers:
            # One pending token is enough: a subscriber always sends the latest snapshot.
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
