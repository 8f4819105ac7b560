"""Bringing a replica up, on a fake bus and simulated GPUs: a cold start that
evicts the least recently used worker to make room, a wake where the sleeper
sleeps, and a wake that loses its sleeper to a stop while it waits for the
place lock."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from ssw.common.probes import Canary, KnownAnswer
from ssw.common.states import WorkerState
from ssw.errors import LoadFailed, NoCapacity
from ssw.loader.workers.supervisor import Supervisor
from tests.unit.loader.workers.fakes import FakeBus, sleeper, spec, worker


def healthy_probes(supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    async def yes(socket: Path) -> bool:
        return True

    async def nothing_in_flight(socket: Path) -> int:
        return 0

    monkeypatch.setattr(supervisor.probes, "healthy", yes)
    monkeypatch.setattr(supervisor.probes, "in_flight", nothing_in_flight)


async def test_a_cold_start_evicts_the_least_recently_used_worker_then_starts_its_unit(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    healthy_probes(supervisor, monkeypatch)
    bus: FakeBus = supervisor.systemd  # type: ignore[assignment]
    old = worker("b", WorkerState.READY, budget_gb=8, sleep_mode=False, last_used=time.time() - 600)
    supervisor.table.add(old, "ready")
    supervisor.loads.get("a").since = time.time()

    started = await asyncio.wait_for(supervisor.starter.start_replica(spec("a", vram_gb=6), 1), 10)

    assert bus.stopped == ["ssw-worker@b.service"]  # 8 GB of 10 held: it had to give way
    assert supervisor.table.get(old.unit) is None and supervisor.warm.evictions == 1
    assert [u.name for u in bus.started] == ["ssw-worker@a.service"]
    assert started.state is WorkerState.READY and started.gpus == (0,)
    assert started.budget_bytes >= 6 * 10**9
    assert started.socket.parent.is_dir()  # its own socket directory, made before the start
    # Each step of the cold start was timed, in order.
    assert started.marks["placed"] <= started.marks["unit_started"] <= started.marks["healthy"]


async def test_a_start_that_fits_nowhere_names_the_model_and_starts_nothing(supervisor: Supervisor) -> None:
    bus: FakeBus = supervisor.systemd  # type: ignore[assignment]
    pinned = worker("b", WorkerState.READY, budget_gb=8, sleep_mode=False)
    pinned.pinned = True
    supervisor.table.add(pinned, "ready")
    with pytest.raises(NoCapacity) as raised:
        await supervisor.starter.start_replica(spec("a", vram_gb=6), 1)
    assert raised.value.message.startswith("a: needs 7.0 GB")  # the model, and the numbers (6 GB + overhead)
    assert "at most 2.0 GB can be freed" in raised.value.message
    assert bus.started == [] and bus.stopped == [] and len(supervisor.table.units()) == 1


async def test_a_sleeper_wakes_where_it_sleeps_and_serves_after_its_canary(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    asleep = sleeper()
    asleep.sleep_level = 1
    asleep.released.set()
    supervisor.table.add(asleep, "asleep")
    calls: list[str] = []

    async def wake(socket: Path, timeout: float) -> str | None:
        calls.append("wake")
        return None

    async def canary(socket: Path, model: str) -> tuple[Canary, str]:
        calls.append("canary")
        return Canary.PASSED, ""

    monkeypatch.setattr(supervisor.probes, "wake", wake)
    monkeypatch.setattr(supervisor.probes, "canary", canary)
    woken = await asyncio.wait_for(supervisor.starter.wake(spec("a"), asleep, None), 10)
    assert woken is asleep and asleep.state is WorkerState.READY and asleep.sleep_level == 0
    assert calls == ["wake", "canary"]
    assert supervisor.store.wake_seconds("a", 1) is not None  # measured for the next Retry-After


async def test_a_wake_whose_sleeper_was_stopped_meanwhile_loads_cold_and_fails_nothing(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    asleep = sleeper()
    supervisor.table.add(asleep, "asleep")
    started: list[int] = []

    async def cold_start(spec: Any, replica: int, gpu: int | None = None, evict: bool = True) -> str:
        started.append(replica)
        return "cold"

    monkeypatch.setattr(supervisor.starter, "start_replica", cold_start)
    stub: Any = type("Spec", (), {"name": "a"})()
    async with supervisor.inventory.place_lock:  # another load places, and stops the sleeper (over budget)
        waking = asyncio.ensure_future(supervisor.starter.wake(stub, asleep, None))
        await asyncio.sleep(0.01)
        supervisor.table.move(asleep, WorkerState.STOPPING, "stopped: sleepers over the host memory budget")
    await asyncio.sleep(0.01)
    assert not waking.done() and not started  # it waits for that unit to be gone
    supervisor.table.move(asleep, WorkerState.GONE, "unit ended")
    assert await asyncio.wait_for(waking, 5) == "cold" and started == [1]


def answering(supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch, *texts: str) -> list[str]:
    """The engine answers the fixed prompt with each text in turn (the last one after that)."""
    asked: list[str] = []

    async def known_answer(socket: Path, model: str) -> tuple[Canary, KnownAnswer | None, str]:
        text = texts[min(len(asked), len(texts) - 1)]
        asked.append(text)
        return Canary.PASSED, KnownAnswer(text, (-0.5, -1.0)), ""

    monkeypatch.setattr(supervisor.probes, "known_answer", known_answer)
    return asked


async def test_a_models_first_start_records_its_answer_and_a_later_start_must_repeat_it(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    healthy_probes(supervisor, monkeypatch)
    answering(supervisor, monkeypatch, " Paris.", " Paris.", " Lyon?")
    bus: FakeBus = supervisor.systemd  # type: ignore[assignment]
    a = spec("a")
    first = await asyncio.wait_for(supervisor.starter.start_replica(a, 1), 10)
    assert supervisor.store.known_answer("a", a.fingerprint) == KnownAnswer(" Paris.", (-0.5, -1.0))
    await supervisor.retirer.retire(first, "test")
    second = await asyncio.wait_for(supervisor.starter.start_replica(a, 1), 10)  # answers " Paris." again
    assert second.state is WorkerState.READY
    await supervisor.retirer.retire(second, "test")
    with pytest.raises(LoadFailed) as raised:
        await asyncio.wait_for(supervisor.starter.start_replica(a, 1), 10)
    assert "the known answer after a start differs: ' Lyon?' where ' Paris.' was recorded" in raised.value.message
    assert bus.stopped[-1] == "ssw-worker@a.service" and supervisor.table.of_model("a") == []
    status = supervisor.store.known_answer_status("a")
    assert status["failures"] == 1 and status["sleep_blocked"] is None  # a start's failure: not the warm tier's


async def test_a_wrong_answer_after_a_wake_stops_the_sleeper_loads_cold_and_ends_sleeping(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    healthy_probes(supervisor, monkeypatch)
    answering(supervisor, monkeypatch, " garbage")
    bus: FakeBus = supervisor.systemd  # type: ignore[assignment]
    a = spec("a")
    await supervisor.store.record_known_answer("a", a.fingerprint, KnownAnswer(" Paris.", (-0.5, -1.0)))
    failed: list[tuple[str, str]] = []
    supervisor.starter.on_check_failed = lambda model, after: failed.append((model, after))
    asleep = sleeper()
    asleep.sleep_level = 2
    asleep.released.set()
    supervisor.table.add(asleep, "asleep")
    cold: list[int] = []

    async def cold_start(spec: Any, replica: int, gpu: int | None = None, evict: bool = True) -> str:
        cold.append(replica)
        return "cold"

    async def woken(socket: Path, timeout: float) -> None:
        return None

    async def canary(socket: Path, model: str) -> tuple[Canary, str]:
        return Canary.PASSED, ""  # it generates: only its answer is wrong

    monkeypatch.setattr(supervisor.probes, "wake", woken)
    monkeypatch.setattr(supervisor.probes, "canary", canary)
    monkeypatch.setattr(supervisor.starter, "start_replica", cold_start)
    assert await asyncio.wait_for(supervisor.starter.wake(a, asleep, None), 10) == "cold" and cold == [1]
    assert bus.stopped == [asleep.unit] and asleep.state is WorkerState.GONE
    blocked = supervisor.store.sleep_blocked("a")
    assert blocked is not None and "' garbage' where ' Paris.' was recorded" in blocked
    assert failed == [("a", "wake")]
    # An operator's all-clear: it may sleep again, and its answer is recorded anew.
    assert await supervisor.store.clear_known_answer("a")
    assert supervisor.store.sleep_blocked("a") is None and supervisor.store.known_answer("a", a.fingerprint) is None
