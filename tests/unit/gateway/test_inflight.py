"""The requests in flight per worker: counts by priority, what was served, and the
cap on interactive and batch work while realtime traffic is about."""

from __future__ import annotations

import asyncio

import pytest

from ssw.gateway.inflight import InFlight


async def test_counts_by_priority_and_served_once_answered() -> None:
    changes: list[int] = []
    f = InFlight(on_change=lambda: changes.append(f.total()))
    await f.enter("w1", "m", "interactive")
    await f.enter("w1", "m", "batch")
    await f.enter("w2", "m", "realtime")
    assert f.demand() == {"w1": {"interactive": 1, "batch": 1}, "w2": {"realtime": 1}}
    f.leave("w1", "batch", answered=True)
    f.leave("w2", "realtime", answered=False)  # a failover: not served
    assert f.demand() == {"w1": {"interactive": 1}}
    assert f.served == {"w1": 1} and f.count("w1") == 1 and f.total() == 1
    assert changes == [1, 2, 3, 2, 1]  # every change is told


@pytest.mark.parametrize(
    ("realtime_first", "priority", "capped"),
    [
        (False, "interactive", False),  # no realtime traffic: no cap
        (True, "interactive", True),
        (True, "batch", True),
        (True, "realtime", False),  # realtime is never capped
    ],
)
async def test_the_cap_holds_only_non_realtime_work_while_realtime_is_about(
    realtime_first: bool, priority: str, capped: bool
) -> None:
    f = InFlight(cap=2, realtime_window_s=30)
    if realtime_first:
        await f.enter("w1", "m", "realtime")
        f.leave("w1", "realtime", answered=True)
    await f.enter("w1", "m", "interactive")
    await f.enter("w1", "m", "batch")
    assert f.capped("w1", "m", priority) is capped
    assert f.capped("w1", "other-model", priority) is False  # realtime traffic is per model


async def test_a_capped_request_waits_for_a_slot_and_then_enters() -> None:
    f = InFlight(cap=1, realtime_window_s=30)
    await f.enter("w1", "m", "realtime")
    await f.enter("w1", "m", "batch")
    second = asyncio.create_task(f.enter("w1", "m", "batch"))
    await asyncio.sleep(0.05)
    assert not second.done() and f.count("w1") == 2  # held in the gateway, not sent
    f.leave("w1", "batch", answered=True)
    await asyncio.wait_for(second, 1)
    assert f.demand() == {"w1": {"realtime": 1, "batch": 1}}


async def test_the_cap_lifts_once_the_realtime_window_has_passed() -> None:
    f = InFlight(cap=1, realtime_window_s=0.2)
    await f.enter("w1", "m", "realtime")
    f.leave("w1", "realtime", answered=True)
    await f.enter("w1", "m", "batch")
    assert f.capped("w1", "m", "batch")
    await asyncio.sleep(0.25)
    assert not f.capped("w1", "m", "batch")


async def test_a_request_relayed_to_another_host_is_counted_but_never_capped_here() -> None:
    f = InFlight(cap=1, realtime_window_s=30)
    await f.enter("host-b", "m", "realtime")
    await f.enter("host-b", "m", "batch")
    await asyncio.wait_for(f.enter("host-b", "m", "batch", cap=False), 1)
    assert f.count("host-b") == 3
