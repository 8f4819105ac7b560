"""The conductor, on a fake bus: a ready worker whose unit fails is replaced after a
backoff (recovery as decide/recovery says), an unload ends a load and its workers,
and a worker that hangs is killed and its model brought back."""

from __future__ import annotations

import asyncio
import signal

from ssw.common.states import LoadState, WorkerState
from ssw.loader.workers.supervisor import Supervisor
from tests.unit.loader.workers.fakes import FakeBus, worker


async def test_a_ready_worker_whose_unit_fails_is_brought_back_after_a_backoff(supervisor: Supervisor) -> None:
    bus: FakeBus = supervisor.systemd  # type: ignore[assignment]
    w = worker("a", WorkerState.READY)
    supervisor.table.add(w, "ready")
    bus.emit(w.unit, "failed", "failed")
    assert supervisor.table.get(w.unit) is None and w.state is WorkerState.FAILED
    rec = supervisor.loads.get("a")
    assert rec.state is LoadState.BACKING_OFF and "died" in rec.reason
    assert rec.deadline is not None and rec.task is not None  # the retry waits for its deadline


async def test_a_second_death_within_the_window_backs_off_longer(supervisor: Supervisor) -> None:
    bus: FakeBus = supervisor.systemd  # type: ignore[assignment]
    delays = []
    for _ in range(2):
        w = worker("a", WorkerState.READY)
        supervisor.table.add(w, "ready")
        bus.emit(w.unit, "failed", "failed")
        rec = supervisor.loads.get("a")
        assert rec.deadline is not None
        delays.append(rec.deadline)
        rec.task.cancel()  # type: ignore[union-attr]
        supervisor.loads.move(rec, LoadState.IDLE, "test: the retry is not run")
    assert delays[1] - delays[0] > 0 and len(supervisor.loads.get("a").failures) == 2


async def test_unload_retires_the_models_workers_and_answers_once_they_are_gone(supervisor: Supervisor) -> None:
    bus: FakeBus = supervisor.systemd  # type: ignore[assignment]
    asleep = worker("a")
    supervisor.table.add(asleep, "asleep")
    assert await asyncio.wait_for(supervisor.unload("a"), 5) == [asleep.unit]
    assert bus.stopped == [asleep.unit] and supervisor.table.of_model("a") == []


async def test_a_hung_worker_is_killed_and_its_model_recovers(supervisor: Supervisor) -> None:
    bus: FakeBus = supervisor.systemd  # type: ignore[assignment]
    w = worker("a", WorkerState.READY)
    supervisor.table.add(w, "ready")
    for _ in range(supervisor.cfg.health.failures_to_replace):
        supervisor.health._checked(w, "health", False, "/health did not answer 200")
    await asyncio.sleep(0.05)
    assert bus.killed == [(w.unit, signal.SIGKILL)] and bus.stopped == [w.unit]
    assert w.state is WorkerState.FAILED and w.failure is not None and w.failure.startswith("hung")
    assert supervisor.loads.get("a").state is LoadState.BACKING_OFF
