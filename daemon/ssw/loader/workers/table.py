"""The worker table: every worker ssw tracks, and the only place a worker's
state changes. Each change follows the transition table in
:mod:`ssw.common.states`, is logged once with the unit name, and is published to
subscribers (the gateway's snapshot stream).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ssw.common.contract import WorkerView
from ssw.common.states import ASLEEP, LEAVING, LIVE, TERMINAL, IllegalTransition, WorkerState, check_worker_move
from ssw.loader.systemd.engine import RankPart
from ssw.loader.workers.lifecycle import Lifecycle

log = logging.getLogger(__name__)


@dataclass
class Worker:
    model: str
    replica: int  # which of the model's replicas it is (models.yaml `gpus` pins by replica)
    unit: str
    socket: Path
    gpus: tuple[int, ...]
    budget_bytes: int  # reserved on each of its GPUs
    state: WorkerState
    pinned: bool = False
    started_at: float = field(default_factory=time.time)
    state_since: float = field(default_factory=time.time)
    state_reason: str = ""
    last_used: float = field(default_factory=time.time)
    interactive_used: float = 0.0  # wall time of its last request that was not batch work
    adopted: bool = False
    held_bytes: int | None = None  # measured on its busiest GPU (NVML); None: unknown
    # When each step of its load happened (time.time()): requested, placed, evicted,
    # unit_started, bound (vLLM binds its socket before it builds the engine), healthy.
    marks: dict[str, float] = field(default_factory=dict)
    # systemd reports a new transient unit as inactive before it activates; only
    # an inactive state after the unit was seen running means the worker ended.
    unit_seen_active: bool = False
    # Consecutive failed checks while ready or unhealthy, per kind ("health", "canary"):
    # a passing /health does not clear a failing canary.
    check_failures: dict[str, int] = field(default_factory=dict)
    canary: bool = True  # False once the engine showed it does not generate (an embedding model)
    # Why ssw is stopping a worker that failed (start failed, hung): it then ends as failed, not gone.
    failure: str | None = None
    # Its drain-then-stop, once begun (a unit name outlives a worker: never key this by name).
    retirement: asyncio.Task[None] | None = None
    # Resolved when the worker leaves the table: None when it was asked to go,
    # else why it ended.
    done: asyncio.Future[str | None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    # Set once it no longer holds the GPU memory it is giving back: asleep, or gone.
    released: asyncio.Event = field(default_factory=asyncio.Event)
    sleep_mode: bool = False  # started with vLLM's sleep mode
    trial: bool = False  # a cold-start trial with other start options than configured
    # LoRA adapters loaded in it (model name -> when it last served one), and the lock
    # that keeps its loads and unloads of adapters one at a time.
    adapters: dict[str, float] = field(default_factory=dict)
    adapter_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    sleep_level: int = 0  # the level it sleeps at (or is going to sleep at, while draining); 0: none
    slept_at: float = 0.0  # wall time it fell asleep
    ram_bytes: int | None = None  # its unit's MemoryCurrent, read while it sleeps
    retire_cause: str = "other"  # why it is being taken down (lifecycle.CAUSES), once it is
    # A rank of a model across hosts (its group, its node rank); None for a worker of one host.
    part: RankPart | None = None

    @property
    def headless(self) -> bool:
        """A rank that serves nothing itself (its group's head does): never routed to, never
        probed, started and stopped with its group."""
        return self.part is not None and self.part.rank > 0

    @property
    def fixed(self) -> bool:
        """Not this host's to evict: pinned, or a headless rank (its group's head decides
        for every rank)."""
        return self.pinned or self.headless

    @property
    def live(self) -> bool:
        return self.state in LIVE

    def view(self, now: float) -> WorkerView:
        return WorkerView(
            unit=self.unit,
            model=self.model,
            replica=self.replica,
            state=self.state,
            state_reason=self.state_reason,
            state_for_s=round(now - self.state_since, 1),
            gpus=list(self.gpus),
            socket=str(self.socket),
            pinned=self.fixed,
            vram_budget_bytes=self.budget_bytes,
            vram_measured_bytes=self.held_bytes,
            uptime_s=round(now - self.started_at, 1),
            idle_s=round(now - self.last_used, 1),
            adopted=self.adopted,
            unit_active=self.unit_seen_active,
            load_phases_s=load_phases(self.marks),
            load_marks={k: round(v, 4) for k, v in self.marks.items()},
            adapters=sorted(self.adapters),
            sleep_mode=self.sleep_mode,
            sleep_level=self.sleep_level or None if self.state is WorkerState.SLEEPING else None,
            ram_bytes=self.ram_bytes,
            rank=self.part.rank if self.part else 0,
            group=self.part.group.describe() if self.part else None,
        )


# A load, step by step: each phase ends at its mark and starts at the one before.
PHASES = (
    ("placement", "placed"),  # deciding where (and whom to evict)
    ("eviction", "evicted"),  # victims and leaving workers shutting down; waiting for the GPU's start lock
    ("unit_start", "unit_started"),  # StartTransientUnit until systemd's job is done
    ("process_up", "bound"),  # Python and vLLM's imports until it binds its socket
    ("engine_ready", "healthy"),  # weights, KV cache, warm-up until /health answers 200
)


def load_phases(marks: dict[str, float]) -> dict[str, float] | None:
    """Seconds spent in each phase of a load, up to the last one reached ("total" once
    healthy); None for an adopted worker, whose load this loader did not see."""
    start = marks.get("requested")
    if start is None:
        return None
    phases: dict[str, float] = {}
    previous = start
    for phase, mark in PHASES:
        at = marks.get(mark)
        if at is None:
            break
        phases[phase] = round(at - previous, 3)
        previous = at
    if "healthy" in marks:
        phases["total"] = round(marks["healthy"] - start, 3)
    return phases


def describe_phases(marks: dict[str, float]) -> str:
    phases = load_phases(marks) or {}
    return ", ".join(f"{phase.replace('_', ' ')} {phases[phase]:.2f} s" for phase, _ in PHASES if phase in phases)


class WorkerTable:
    def __init__(self, on_change: Callable[[], None], lifecycle: Lifecycle | None = None) -> None:
        self._workers: dict[str, Worker] = {}
        self._on_change = on_change
        self._lifecycle = lifecycle
        self.on_leave: Callable[[Worker, WorkerState, WorkerState], None] | None = None

    def __iter__(self) -> Iterator[Worker]:
        return iter(list(self._workers.values()))

    def __len__(self) -> int:
        return len(self._workers)

    def get(self, unit: str) -> Worker | None:
        return self._workers.get(unit)

    def units(self) -> set[str]:
        return set(self._workers)

    def of_model(self, model: str) -> list[Worker]:
        return sorted((w for w in self._workers.values() if w.model == model), key=lambda w: (w.replica, w.unit))

    def live(self, model: str) -> list[Worker]:
        """The model's workers that serve or are about to (a headless rank serves nothing here)."""
        return [w for w in self.of_model(model) if w.state in LIVE and not w.headless]

    def ready(self, model: str) -> list[Worker]:
        return [w for w in self.of_model(model) if w.state is WorkerState.READY and not w.headless]

    def leaving_on(self, gpus: tuple[int, ...]) -> list[Worker]:
        return [w for w in self._workers.values() if w.state in LEAVING and set(w.gpus) & set(gpus)]

    def asleep(self, model: str | None = None) -> list[Worker]:
        return [w for w in self._workers.values() if w.state in ASLEEP and (model is None or w.model == model)]

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in WorkerState if s not in TERMINAL}
        for w in self._workers.values():
            out[w.state.value] += 1
        return out

    def mark(self, worker: Worker, step: str, at: float | None = None) -> None:
        """A step of its load is done (PHASES): its phase shows in the snapshot at once."""
        worker.marks[step] = time.time() if at is None else at
        if self._workers.get(worker.unit) is worker:
            self._on_change()

    def add(self, worker: Worker, how: str) -> None:
        if worker.unit in self._workers:
            raise IllegalTransition(f"{worker.unit} is already in the worker table")
        self._workers[worker.unit] = worker
        log.info("%s: %s as %s (%s)", worker.unit, how, worker.state.value, worker.state_reason or "-")
        self._on_change()

    def move(self, worker: Worker, state: WorkerState, reason: str = "") -> None:
        """Apply one transition, or refuse loudly: an impossible move is a bug."""
        if self._workers.get(worker.unit) is not worker:
            return  # it already left the table
        if worker.state is state:
            return
        try:
            check_worker_move(worker.state, state)
        except IllegalTransition:
            log.error("BUG: %s: refused %s -> %s (%s)", worker.unit, worker.state.value, state.value, reason)
            raise
        previous = worker.state
        level = logging.WARNING if state in (WorkerState.FAILED, WorkerState.UNHEALTHY) else logging.INFO
        log.log(level, "%s: %s -> %s%s", worker.unit, previous.value, state.value, f" ({reason})" if reason else "")
        now = time.time()
        if self._lifecycle is not None:
            self._lifecycle.worker_moved(
                worker.model,
                worker.unit,
                previous,
                state,
                reason,
                now - worker.state_since,
                worker.retire_cause,
                worker.sleep_level,
                load_phases(worker.marks),
                worker.marks,
            )
        worker.state = state
        worker.state_since = now
        worker.state_reason = reason
        if state in TERMINAL or (previous in LEAVING and state not in LEAVING):
            worker.released.set()
        elif state in LEAVING:
            worker.released.clear()  # a worker woken from an earlier sleep is giving memory back again
        if state in TERMINAL:
            del self._workers[worker.unit]
            if not worker.done.done():
                worker.done.set_result(reason if state is WorkerState.FAILED else None)
            if self.on_leave is not None:
                self.on_leave(worker, previous, state)
        self._on_change()
