"""Taking over the units a previous loader left running, on a fake bus: a healthy
one is ready at once, one still starting whose model left the registry is retired."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ssw.common.states import WorkerState
from ssw.loader.systemd import engine
from ssw.loader.workers.supervisor import Supervisor
from ssw.loader.workers.table import Worker


def running_unit(supervisor: Supervisor, model: str, budget: int) -> str:
    """A worker unit a previous loader left running: its name, with its SSW_* environment."""
    unit = f"ssw-worker@{model}.service"
    supervisor.systemd.units = {  # type: ignore[attr-defined]
        unit: {
            engine.ENV_MODEL: model,
            engine.ENV_REPLICA: "1",
            engine.ENV_SOCKET: f"/nonexistent/{model}/http.sock",
            engine.ENV_GPU: "0",
            engine.ENV_BUDGET: str(budget),
        }
    }
    return unit


async def test_an_adopted_starting_worker_whose_model_left_the_registry_is_retired(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    unit = running_unit(supervisor, "gone", 10**9)
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


async def test_a_healthy_unit_is_adopted_ready_with_what_its_environment_says(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    unit = running_unit(supervisor, "a", 3 * 10**9)

    async def healthy(socket: Path) -> bool:
        return True

    monkeypatch.setattr(supervisor.probes, "healthy", healthy)
    monkeypatch.setattr(supervisor.sockets, "remove_stale", lambda: None)
    await supervisor.adopter.adopt()
    adopted = supervisor.table.get(unit)
    assert adopted is not None and adopted.adopted and adopted.state is WorkerState.READY
    assert adopted.gpus == (0,) and adopted.budget_bytes == 3 * 10**9
    assert unit in supervisor.systemd.watched  # type: ignore[attr-defined]
    assert supervisor.loads.get("a").state.value == "idle"  # nothing to load: it serves
