"""The supervisor's paths that the end-to-end suite cannot time: a wake that loses
its sleeper to a stop while it waits for the placement lock, a drain whose worker
cannot say what it has in flight, and an adopted worker whose model left the
registry. A fake bus and simulated GPUs; no systemd."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from ssw.common.states import WorkerState
from ssw.config import Config
from ssw.loader.gpus import make_gpu_source
from ssw.loader.models.catalog import Catalog
from ssw.loader.models.registry import Registry
from ssw.loader.store import FactStore, Retiring
from ssw.loader.systemd import engine
from ssw.loader.systemd.bus import UnitDetails, UnitStatus
from ssw.loader.workers.parts import Parts
from ssw.loader.workers.retire import DRAINED
from ssw.loader.workers.supervisor import Supervisor
from ssw.loader.workers.table import Worker


class FakeBus:
    """The calls the supervisor makes of systemd, answered from a dict of units."""

    def __init__(self, units: dict[str, dict[str, str]] | None = None) -> None:
        self.units = units or {}  # name -> its SSW_* environment
        self.watched: set[str] = set()

    def on_state_change(self, callback: Any) -> None:
        self.callback = callback

    def watch(self, unit: str) -> None:
        self.watched.add(unit)

    def unwatch(self, unit: str) -> None:
        self.watched.discard(unit)

    async def list_units(self, pattern: str) -> list[UnitStatus]:
        return [UnitStatus(name, "activating", "start", "/x") for name in self.units]

    async def details(self, name: str) -> UnitDetails | None:
        env = self.units.get(name)
        if env is None:
            return None
        return UnitDetails(name, "activating", "start", 42, env, None, None, 0, "ssw-workers.slice", True)


def sleeper(model: str = "a") -> Worker:
    return Worker(
        model=model,
        replica=1,
        unit=f"ssw-worker@{model}.service",
        socket=Path(f"/nonexistent/{model}/http.sock"),
        gpus=(0,),
        budget_bytes=10**9,
        state=WorkerState.SLEEPING,
        sleep_mode=True,
    )


@pytest.fixture
def supervisor(tmp_path: Path) -> Supervisor:
    cfg = Config.model_validate(
        {
            "state_dir": str(tmp_path),
            "gpus": {"source": "simulated", "simulated": [{"memory_gb": 10}]},
            "workers": {"drain_timeout_s": 1.2},
        }
    )
    parts = Parts.build(
        cfg,
        FakeBus(),  # type: ignore[arg-type]
        make_gpu_source(cfg.gpus),
        Catalog(Registry(models={}, aliases={})),
        FactStore(tmp_path / "facts.json"),
        Retiring(tmp_path / "retiring.json"),
    )
    return Supervisor(parts)


async def test_a_wake_whose_sleeper_was_stopped_meanwhile_loads_cold_and_fails_nothing(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = sleeper()
    supervisor.table.add(worker, "asleep")
    started: list[int] = []

    async def cold_start(spec: Any, replica: int, gpu: int | None = None, evict: bool = True) -> str:
        started.append(replica)
        return "cold"

    monkeypatch.setattr(supervisor.starter, "start_replica", cold_start)
    spec: Any = type("Spec", (), {"name": "a"})()
    async with supervisor.inventory.place_lock:  # another load places, and stops the sleeper (over budget)
        wake = asyncio.ensure_future(supervisor.starter.wake(spec, worker, None))
        await asyncio.sleep(0.01)
        supervisor.table.move(worker, WorkerState.STOPPING, "stopped: sleepers over the host memory budget")
    await asyncio.sleep(0.01)
    assert not wake.done() and not started  # it waits for that unit to be gone
    supervisor.table.move(worker, WorkerState.GONE, "unit ended")
    assert await asyncio.wait_for(wake, 5) == "cold" and started == [1]


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


async def test_an_adopted_starting_worker_whose_model_left_the_registry_is_retired(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    unit = "ssw-worker@gone.service"
    supervisor.systemd.units = {  # type: ignore[attr-defined]
        unit: {
            engine.ENV_MODEL: "gone",
            engine.ENV_REPLICA: "1",
            engine.ENV_SOCKET: "/nonexistent/gone/http.sock",
            engine.ENV_GPU: "0",
            engine.ENV_BUDGET: str(10**9),
        }
    }
    stopped: list[str] = []

    async def stop_unit(worker: Worker) -> None:
        stopped.append(worker.unit)
        supervisor.table.move(worker, WorkerState.GONE, "stopped")

    async def unhealthy(socket: Path) -> bool:
        return False

    monkeypatch.setattr(supervisor.retirer, "stop_unit", stop_unit)
    monkeypatch.setattr(supervisor.probes, "healthy", unhealthy)
    monkeypatch.setattr(supervisor.sockets, "remove_stale", lambda: None)
    await supervisor.adopter.adopt()
    for _ in range(100):
        if stopped:
            break
        await asyncio.sleep(0.01)
    assert stopped == [unit] and supervisor.table.get(unit) is None
