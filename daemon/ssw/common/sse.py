"""A server-sent event stream fed from a queue: what the loader's /events and the status
page's stream share. Each item put on the queue is rendered and sent; after a silence
a keep-alive comment goes out (proxies and clients see the stream is alive); the stream
ends when its ``closing`` event is set (a stopping server ends its streams instead of
waiting out its grace period for them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

T = TypeVar("T")
KEEPALIVE = b": keep-alive\n\n"


async def until_closed(
    queue: asyncio.Queue[T], render: Callable[[T], bytes], closing: asyncio.Event, keepalive_s: float
) -> AsyncIterator[bytes]:
    ended = asyncio.ensure_future(closing.wait())
    getter: asyncio.Future[T] | None = None
    try:
        while not closing.is_set():
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, ended}, timeout=keepalive_s, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield render(getter.result())
            else:
                getter.cancel()
                if not done:
                    yield KEEPALIVE
    finally:
        ended.cancel()
        if getter is not None:
            getter.cancel()
