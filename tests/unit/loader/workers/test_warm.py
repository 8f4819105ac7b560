"""The warm tier's choices, carried out on a fake bus: a victim with sleep mode off is
stopped, a sleeping victim is stopped, and a load for batch work says which model in
interactive use it would evict."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from ssw.common.states import WorkerState
from ssw.loader.workers.supervisor import Supervisor
from tests.unit.loader.workers.fakes import FakeBus, spec, worker


async def test_victims_are_stopped_when_they_cannot_sleep_and_counted(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def nothing_in_flight(socket: Path) -> int:
        return 0

    monkeypatch.setattr(supervisor.probes, "in_flight", nothing_in_flight)
    bus: FakeBus = supervisor.systemd  # type: ignore[assignment]
    awake = worker("a", WorkerState.READY, sleep_mode=False)
    asleep = worker("b")
    supervisor.table.add(awake, "ready")
    supervisor.table.add(asleep, "asleep")
    await supervisor.warm.evict((awake.unit, asleep.unit), "c", 0)
    assert supervisor.warm.evictions == 2
    assert "evicted to make room for c on GPU 0" in awake.state_reason and "to stop" in awake.state_reason
    await asyncio.wait_for(asyncio.gather(asyncio.shield(awake.done), asyncio.shield(asleep.done)), 5)
    assert sorted(bus.stopped) == sorted([awake.unit, asleep.unit])


async def test_a_batch_load_names_the_interactive_model_it_would_evict(supervisor: Supervisor) -> None:
    busy = worker("b", WorkerState.READY, budget_gb=8, sleep_mode=False)
    busy.interactive_used = time.time() - 5
    supervisor.table.add(busy, "ready")
    found = await supervisor.warm.evicts_protected(spec("a", vram_gb=6), protect_since=time.time() - 60)
    assert found is not None and found.startswith("b (used ")
    # Used interactively before the protection window: fair game, nothing named.
    assert await supervisor.warm.evicts_protected(spec("a", vram_gb=6), protect_since=time.time()) is None


async def test_a_clients_keep_alive_lasts_while_the_model_is_up_and_zero_does_not_stick(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def nothing_in_flight(socket: Path) -> int:
        return 0

    monkeypatch.setattr(supervisor.probes, "in_flight", nothing_in_flight)
    model = next(iter(supervisor.catalog.models))
    up = worker(model, WorkerState.READY, sleep_mode=False)
    supervisor.table.add(up, "ready")
    assert await supervisor.warm.set_keep_alive(model, 600) == []
    assert supervisor.warm.idle_ttl(model) == (600, "keep_alive")
    # 0 unloads now, and is not remembered: the next load keeps models.yaml's idle_ttl_s.
    assert await supervisor.warm.set_keep_alive(model, 0) == [up.unit]
    assert supervisor.warm.idle_ttl(model)[1] == "idle_ttl_s"
    await asyncio.wait_for(asyncio.shield(up.done), 5)
    # A keep_alive set while up ends with the model's last worker.
    again = worker(model, WorkerState.READY, sleep_mode=False)
    supervisor.table.add(again, "ready")
    await supervisor.warm.set_keep_alive(model, -1)
    supervisor.retirer.retire(again, "unload requested", cause="unload")
    await asyncio.wait_for(asyncio.shield(again.done), 5)
    assert supervisor.warm.idle_ttl(model)[1] == "idle_ttl_s"
