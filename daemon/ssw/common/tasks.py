"""Ending background tasks: cancel, then wait until each has ended, its own
cancellation not being an error (an error it ended with still is)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

from ssw.errors import SswError

log = logging.getLogger(__name__)
T = TypeVar("T")


async def cancel(*tasks: asyncio.Future[Any] | None) -> None:
    for task in tasks:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class TaskSet:
    """Background tasks that end with their owner: each one is kept (a task nobody holds
    may be collected mid-flight), a crash is logged once (a domain error is its own
    message, already logged where it arose), and ``close`` cancels them all."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closing = False  # shutting down: what is cancelled now is not a failure

    def spawn(self, coro: Awaitable[T]) -> asyncio.Task[T]:
        task: asyncio.Task[T] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_crash)
        return task

    async def close(self) -> None:
        self.closing = True
        pending = list(self._tasks)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(BaseException):
                await task


def _log_crash(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not isinstance(exc, SswError):
        log.error("background task failed", exc_info=exc)
