"""A queue as server-sent events: each item rendered, keep-alives in the silences, an end
when the stream is told to close."""

from __future__ import annotations

import asyncio

from ssw.common.sse import KEEPALIVE, until_closed


async def test_items_then_keepalives_then_the_end() -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    closing = asyncio.Event()
    stream = until_closed(queue, lambda n: b"%d\n" % n, closing, keepalive_s=0.05)
    queue.put_nowait(1)
    assert await anext(stream) == b"1\n"
    assert await asyncio.wait_for(anext(stream), 1) == KEEPALIVE  # nothing for a while
    queue.put_nowait(2)
    assert await anext(stream) == b"2\n"
    closing.set()
    chunks = [chunk async for chunk in stream]
    assert chunks == []  # closed: it ends, however long its keep-alive interval
