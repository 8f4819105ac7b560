"""Taking workers down, on a fake bus and simulated GPUs: a drain whose worker
cannot say what it has in flight, a drained worker put to sleep (and its memory
seen free), and one whose sleep fails, stopped instead."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ssw.common.states import WorkerState
from ssw.loader.workers.retire import DRAINED
from ssw.loader.workers.supervisor import Supervisor
from tests.unit.loader.workers.fakes import FakeBus, sleeper, worker


async def test_a_drain_with_no_answer_from_the_worker_waits_its_bound_rather_than_assume_zero(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = sleeper()
    worker.state = WorkerState.DRAINING
    supervisor.table.add(worker, "draining")
    answers: list[int | None] = [None]

    async def in_flight(socket: Path) -> int | None:
        return answers[0]

    monkeypatch.setattr(supervisor.probes, "in_flight", in_flight)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    outcome = await supervisor.retirer.drain(worker)
    assert loop.time() - t0 >= 1.2
    assert "did not say what it has in flight" in outcome
    answers[0] = 0
    assert await supervisor.retirer.drain(worker) == DRAINED


def quiet_worker(supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch, sleeps: bool) -> list[int]:
    """A worker with nothing in flight; its sleep succeeds or not. Returns the sleep levels asked."""
    asked: list[int] = []

    async def nothing_in_flight(socket: Path) -> int:
        return 0

    async def sleep(socket: Path, level: int, timeout: float) -> str | None:
        asked.append(level)
        return None if sleeps else "HTTP 500 from /sleep"

    async def is_sleeping(socket: Path) -> bool:
        return sleeps

    monkeypatch.setattr(supervisor.probes, "in_flight", nothing_in_flight)
    monkeypatch.setattr(supervisor.probes, "sleep", sleep)
    monkeypatch.setattr(supervisor.probes, "is_sleeping", is_sleeping)
    return asked


async def test_a_drained_worker_goes_to_sleep_at_its_level_and_its_unit_keeps_running(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = quiet_worker(supervisor, monkeypatch, sleeps=True)
    bus: FakeBus = supervisor.systemd  # type: ignore[assignment]
    w = worker("a", WorkerState.READY)
    supervisor.table.add(w, "ready")
    await asyncio.wait_for(supervisor.retirer.retire(w, "idle 300 s", sleep_level=1), 10)
    assert w.state is WorkerState.SLEEPING and asked == [1]
    assert "asleep at level 1" in w.state_reason
    assert bus.stopped == [] and w.released.is_set()  # its GPU memory counts as free again
    await asyncio.sleep(0.01)
    assert "asleep (level 1)" in bus.descriptions[w.unit]  # shown in systemctl status


async def test_a_worker_whose_sleep_fails_is_stopped_instead(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    quiet_worker(supervisor, monkeypatch, sleeps=False)
    bus: FakeBus = supervisor.systemd  # type: ignore[assignment]
    w = worker("a", WorkerState.READY)
    supervisor.table.add(w, "ready")
    await asyncio.wait_for(supervisor.retirer.retire(w, "evicted", sleep_level=2), 10)
    assert bus.stopped == [w.unit] and supervisor.table.get(w.unit) is None
    assert w.state is WorkerState.GONE


async def test_a_sleeper_is_stopped_without_a_drain(supervisor: Supervisor) -> None:
    bus: FakeBus = supervisor.systemd  # type: ignore[assignment]
    asleep = sleeper()
    supervisor.table.add(asleep, "asleep")
    await asyncio.wait_for(supervisor.retirer.retire(asleep, "unload requested"), 5)
    assert bus.stopped == [asleep.unit] and asleep.state is WorkerState.GONE
