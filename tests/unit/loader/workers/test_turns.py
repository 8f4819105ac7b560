"""A load's turn to evict, on a fake bus and simulated GPUs: a victim that requests
as urgent as the load's are in flight on serves them first (up to
placement.drain_queue_before_swap more, or until idle); a victim that more urgent
requests are in flight on is not swapped out, and past placement.swap_wait_s the
load fails without touching it."""

from __future__ import annotations

import asyncio
import time

import pytest

from ssw.common.states import WorkerState
from ssw.errors import SwapDeferred
from ssw.loader.workers.supervisor import Supervisor
from tests.unit.loader.workers.conftest import SupervisorFactory
from tests.unit.loader.workers.fakes import FakeBus, spec, worker
from tests.unit.loader.workers.test_start import healthy_probes

VICTIM = "ssw-worker@b.service"


def resident_b(supervisor: Supervisor) -> None:
    supervisor.table.add(worker("b", WorkerState.READY, budget_gb=8, sleep_mode=False), "ready")
    supervisor.loads.get("a").since = time.time()


def with_turns(make: SupervisorFactory, drain: int, wait_s: float) -> Supervisor:
    return make(placement={"drain_queue_before_swap": drain, "swap_wait_s": wait_s})


async def test_the_victim_serves_its_queue_up_to_the_bound_then_gives_way(
    make_supervisor: SupervisorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    supervisor = with_turns(make_supervisor, drain=3, wait_s=30)
    healthy_probes(supervisor, monkeypatch)
    bus: FakeBus = supervisor.systemd  # type: ignore[assignment]
    resident_b(supervisor)
    supervisor.demand.report("gw", {VICTIM: {"interactive": 5}}, {VICTIM: 100})

    start = asyncio.create_task(supervisor.starter.start_replica(spec("a", vram_gb=6), 1))
    await asyncio.sleep(0.3)
    assert not start.done() and bus.stopped == []  # b keeps serving
    supervisor.demand.report("gw", {VICTIM: {"interactive": 5}}, {VICTIM: 102})
    await asyncio.sleep(0.3)
    assert bus.stopped == []  # two more served: under the bound
    supervisor.demand.report("gw", {VICTIM: {"interactive": 4}}, {VICTIM: 103})  # the third
    started = await asyncio.wait_for(start, 10)
    assert bus.stopped == [VICTIM] and started.model == "a"


async def test_an_idle_victim_ends_its_turn_at_once(
    make_supervisor: SupervisorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    supervisor = with_turns(make_supervisor, drain=50, wait_s=30)
    healthy_probes(supervisor, monkeypatch)
    resident_b(supervisor)
    supervisor.demand.report("gw", {VICTIM: {"interactive": 2}}, {VICTIM: 0})
    start = asyncio.create_task(supervisor.starter.start_replica(spec("a", vram_gb=6), 1))
    await asyncio.sleep(0.2)
    assert not start.done()
    supervisor.demand.report("gw", {}, {VICTIM: 2})  # its queue is served
    assert (await asyncio.wait_for(start, 10)).model == "a"


async def test_with_the_policy_off_the_victim_goes_at_once(
    make_supervisor: SupervisorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    supervisor = with_turns(make_supervisor, drain=0, wait_s=30)
    healthy_probes(supervisor, monkeypatch)
    bus: FakeBus = supervisor.systemd  # type: ignore[assignment]
    resident_b(supervisor)
    supervisor.demand.report("gw", {VICTIM: {"interactive": 5}}, {VICTIM: 0})
    await asyncio.wait_for(supervisor.starter.start_replica(spec("a", vram_gb=6), 1), 10)
    assert bus.stopped == [VICTIM]


async def test_a_swap_under_more_urgent_requests_waits_for_them(
    make_supervisor: SupervisorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    supervisor = with_turns(make_supervisor, drain=0, wait_s=30)
    healthy_probes(supervisor, monkeypatch)
    bus: FakeBus = supervisor.systemd  # type: ignore[assignment]
    resident_b(supervisor)
    supervisor.loads.get("a").rank = 2  # a load for batch work
    supervisor.demand.report("gw", {VICTIM: {"realtime": 1, "batch": 3}}, {})
    start = asyncio.create_task(supervisor.starter.start_replica(spec("a", vram_gb=6), 1))
    await asyncio.sleep(0.3)
    assert not start.done() and bus.stopped == []
    supervisor.demand.report("gw", {VICTIM: {"batch": 3}}, {})  # the realtime request ended
    await asyncio.wait_for(start, 10)
    assert bus.stopped == [VICTIM]


async def test_a_deferred_swap_fails_after_swap_wait_s_and_leaves_the_victim(
    make_supervisor: SupervisorFactory,
) -> None:
    supervisor = with_turns(make_supervisor, drain=0, wait_s=0.3)
    bus: FakeBus = supervisor.systemd  # type: ignore[assignment]
    resident_b(supervisor)
    supervisor.demand.report("gw", {VICTIM: {"realtime": 1}}, {})
    with pytest.raises(SwapDeferred) as raised:
        await asyncio.wait_for(supervisor.starter.start_replica(spec("a", vram_gb=6), 1), 10)
    assert "waited placement.swap_wait_s" in raised.value.message and VICTIM in raised.value.message
    assert bus.stopped == [] and bus.started == [] and supervisor.table.get(VICTIM) is not None
