"""systemd's D-Bus API as ssw uses it: job outcomes shared by everyone who waits."""

from __future__ import annotations

import asyncio
from typing import Any

from dbus_fast import Message, MessageType

from ssw.loader.systemd.bus import MANAGER, MANAGER_PATH, Systemd


class FakeBus:
    def __init__(self) -> None:
        self.handlers: list[Any] = []

    def add_message_handler(self, handler: Any) -> None:
        self.handlers.append(handler)

    def job_removed(self, job: str, result: str) -> None:
        msg = Message.new_signal(MANAGER_PATH, MANAGER, "JobRemoved", "uoss", [1, job, "ssw-worker@m.service", result])
        assert msg.message_type == MessageType.SIGNAL
        for handler in self.handlers:
            handler(msg)


async def test_two_waits_for_one_merged_job_both_see_it_end() -> None:
    # Two StopUnit calls for one unit get the same job: both must hear it end.
    bus = FakeBus()
    systemd = Systemd(bus)  # type: ignore[arg-type]
    first = asyncio.ensure_future(systemd._wait_job("/org/freedesktop/systemd1/job/7", 5))
    second = asyncio.ensure_future(systemd._wait_job("/org/freedesktop/systemd1/job/7", 5))
    await asyncio.sleep(0)
    bus.job_removed("/org/freedesktop/systemd1/job/7", "done")
    assert await asyncio.wait_for(asyncio.gather(first, second), 1) == ["done", "done"]


async def test_a_job_that_ended_before_its_reply_is_still_seen() -> None:
    bus = FakeBus()
    systemd = Systemd(bus)  # type: ignore[arg-type]
    bus.job_removed("/org/freedesktop/systemd1/job/8", "canceled")
    assert await systemd._wait_job("/org/freedesktop/systemd1/job/8", 1) == "canceled"
    assert await systemd._wait_job("/org/freedesktop/systemd1/job/8", 1) == "canceled"
