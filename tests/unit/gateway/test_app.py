"""The gateway's apps: a body bounded in size and time before FastAPI reads it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ssw.errors import PayloadTooLarge, RequestTimeout
from ssw.gateway.app import bounded_body


async def test_a_bounded_body_fails_past_its_size_or_its_deadline_and_then_passes_through() -> None:
    def feeder(*messages: dict[str, Any], then_wait: bool = False) -> Any:
        queue = list(messages)

        async def receive() -> dict[str, Any]:
            if queue:
                return queue.pop(0)
            await asyncio.sleep(10 if then_wait else 0)
            return {"type": "http.disconnect"}

        return receive

    with pytest.raises(PayloadTooLarge):
        bounded_body(feeder(), b"2000", 1000, 1.0)
    first = {"type": "http.request", "body": b"x" * 600, "more_body": True}
    read = bounded_body(feeder(first, {**first, "more_body": False}), None, 1000, 1.0)
    await read()
    with pytest.raises(PayloadTooLarge):
        await read()
    read = bounded_body(
        feeder({"type": "http.request", "body": b"x", "more_body": True}, then_wait=True), None, 1000, 0.2
    )
    await read()
    with pytest.raises(RequestTimeout):
        await read()
    # Once the body is whole, a wait for the client leaving is not cut short.
    read = bounded_body(feeder({"type": "http.request", "body": b"x", "more_body": False}), None, 1000, 0.01)
    assert (await read())["body"] == b"x"
    assert (await read())["type"] == "http.disconnect"
