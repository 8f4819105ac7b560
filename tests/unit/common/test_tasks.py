from __future__ import annotations

import asyncio

import pytest

from ssw.common import tasks


async def test_cancel_ends_each_task_and_skips_none() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    a, b = asyncio.create_task(forever()), asyncio.create_task(forever())
    await started.wait()
    await tasks.cancel(a, None, b)
    assert a.cancelled() and b.cancelled()


async def test_an_error_a_task_ended_with_is_still_raised() -> None:
    async def fails() -> None:
        raise ValueError("broken")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="broken"):
        await tasks.cancel(task)
