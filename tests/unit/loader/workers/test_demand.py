"""The gateways' demand as the loader keeps it: summed over reporters, the most
urgent rank per worker, and forgotten once a reporter falls silent."""

from __future__ import annotations

import asyncio

import pytest

from ssw.loader.workers import demand as demand_mod
from ssw.loader.workers.demand import Demand


def test_reports_of_two_gateway_processes_add_up() -> None:
    d = Demand()
    d.report("101", {"w1": {"batch": 3}}, {"w1": 10})
    d.report("102", {"w1": {"interactive": 1}, "w2": {"batch": 0}}, {"w1": 5})
    assert d.waiting("w1") == (4, 1)  # four requests, the most urgent interactive
    assert d.waiting("w2") == (0, None)  # a zero is nobody
    assert d.served("w1") == 15
    d.report("101", {}, {"w1": 12})  # the newest report replaces that reporter's last
    assert d.waiting("w1") == (1, 1) and d.served("w1") == 17


def test_a_silent_reporter_is_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    d = Demand()
    d.report("101", {"w1": {"realtime": 2}}, {})
    monkeypatch.setattr(demand_mod, "REPORT_TTL_S", -1.0)
    assert d.waiting("w1") == (0, None)


async def test_a_report_wakes_whoever_waits_for_one() -> None:
    d = Demand()
    waiter = asyncio.create_task(d.wait_change(5))
    await asyncio.sleep(0)
    d.report("101", {}, {})
    await asyncio.wait_for(waiter, 1)
