"""Stand-ins for what the loader's pieces talk to: systemd (a dict of units that
start, stop and report their state changes as systemd would) and a model spec; the
GPUs are ssw's own simulated source, the probes are patched per test."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ssw.common.states import WorkerState
from ssw.loader.decide.vram import GB
from ssw.loader.models.registry import ModelFacts, ModelSpec
from ssw.loader.systemd.bus import UnitDetails, UnitStatus
from ssw.loader.systemd.units import WorkerUnit
from ssw.loader.workers.table import Worker


class FakeBus:
    """The calls the loader makes of systemd, answered from a dict of units."""

    def __init__(self, units: dict[str, dict[str, str]] | None = None) -> None:
        self.units = units or {}  # name -> its SSW_* environment
        self.active: dict[str, str] = {}  # name -> its ActiveState, once started here
        self.watched: set[str] = set()
        self.started: list[WorkerUnit] = []
        self.stopped: list[str] = []
        self.killed: list[tuple[str, int]] = []
        self.descriptions: dict[str, str] = {}
        self._callbacks: list[Callable[[str, str, str], None]] = []

    def on_state_change(self, callback: Callable[[str, str, str], None]) -> None:
        self._callbacks.append(callback)

    def emit(self, unit: str, active: str, sub: str) -> None:
        self.active[unit] = active
        for callback in self._callbacks:
            callback(unit, active, sub)

    def watch(self, unit: str) -> None:
        self.watched.add(unit)

    def unwatch(self, unit: str) -> None:
        self.watched.discard(unit)

    async def list_units(self, pattern: str) -> list[UnitStatus]:
        return [UnitStatus(name, self.active.get(name, "activating"), "start", "/x") for name in self.units]

    async def details(self, name: str) -> UnitDetails | None:
        env = self.units.get(name)
        if env is None:
            return None
        return UnitDetails(name, "activating", "start", 42, env, None, None, 0, "ssw-workers.slice", True)

    async def start_transient(self, unit: WorkerUnit, timeout: float = 60.0) -> None:
        self.started.append(unit)
        self.units[unit.name] = dict(unit.env)
        self.watch(unit.name)
        self.emit(unit.name, "active", "running")

    async def stop(self, name: str, timeout: float) -> None:
        self.stopped.append(name)
        self.units.pop(name, None)
        self.emit(name, "inactive", "dead")

    async def kill(self, name: str, signal: int) -> None:
        self.killed.append((name, signal))

    async def reset_failed(self, name: str) -> None:
        return None

    async def set_description(self, name: str, text: str) -> None:
        self.descriptions[name] = text


def spec(name: str = "a", vram_gb: float = 4.0, **kw: Any) -> ModelSpec:
    facts = ModelFacts(num_layers=4, num_kv_heads=2, head_dim=16, dtype="float16", weight_bytes=GB)
    return ModelSpec(name=name, path=Path(f"/nonexistent/models/{name}"), facts=facts, vram_gb=vram_gb, **kw)


def worker(
    model: str = "a",
    state: WorkerState = WorkerState.SLEEPING,
    budget_gb: float = 1.0,
    sleep_mode: bool = True,
    last_used: float = 0.0,
) -> Worker:
    return Worker(
        model=model,
        replica=1,
        unit=f"ssw-worker@{model}.service",
        socket=Path(f"/nonexistent/{model}/http.sock"),
        gpus=(0,),
        budget_bytes=int(budget_gb * GB),
        state=state,
        sleep_mode=sleep_mode,
        last_used=last_used,
        unit_seen_active=True,
    )


def sleeper(model: str = "a") -> Worker:
    return worker(model)
