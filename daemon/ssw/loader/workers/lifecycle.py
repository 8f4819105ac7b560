"""What happened to workers and loads, told once: every change the worker table or
the load book applies becomes one :class:`Change`, kept in a short log (the status
page's event log) and handed to the listeners (the loader's lifecycle metrics). It
reads the changes; it never makes one."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

from ssw.common.contract import EventView
from ssw.common.states import LIVE, TERMINAL, WorkerState

EVENTS_KEPT = 200

# Why a worker was taken down (bounded: a metric's label). Its reason text says more.
# "group": a rank of a model across hosts, stopped because its group ended.
CAUSES = frozenset(
    {"evicted", "idle", "keep_alive", "unload", "ram_budget", "no_room", "resumed", "replaced", "group", "other"}
)
SERVING = frozenset({WorkerState.READY, WorkerState.UNHEALTHY})


@dataclass(frozen=True, slots=True)
class Change:
    at: float
    model: str
    unit: str | None  # None: a load record's change
    previous: str
    state: str
    reason: str
    held_s: float  # how long it was in the previous state
    cause: str = "other"  # for a worker taken down: why (CAUSES)
    retired: bool = False  # ssw took it out of service (drained or stopped) with this change
    sleep_level: int = 0
    phases: dict[str, float] | None = None  # a load's phases, on reaching ready from starting
    marks: dict[str, float] | None = None  # and when each of its steps happened (wall time)
    served_s: float | None = None  # on leaving service: how long it served since it became ready

    @property
    def kind(self) -> str:
        """The event log's word for it: the state reached, and 'evicted' for an eviction."""
        if self.retired and self.cause == "evicted":
            return "evicted"
        if self.state == WorkerState.FAILED and self.previous in SERVING:
            return "crashed"
        return self.state

    def view(self) -> EventView:
        what = f"{self.unit}: " if self.unit else f"model {self.model}: load "
        text = f"{what}{self.previous} -> {self.state}" + (f" ({self.reason})" if self.reason else "")
        return EventView(at=round(self.at, 3), kind=self.kind, model=self.model, unit=self.unit, text=text)


class Lifecycle:
    def __init__(self) -> None:
        self._events: collections.deque[EventView] = collections.deque(maxlen=EVENTS_KEPT)
        self.listeners: list[Callable[[Change], None]] = []
        self.check_listeners: list[Callable[[str, str], None]] = []  # (model, check) of a failed check
        self._serving_since: dict[str, float] = {}  # unit -> when it last became ready

    def events(self) -> list[EventView]:
        return list(self._events)

    def record(self, change: Change) -> None:
        self._events.append(change.view())
        for listener in self.listeners:
            listener(change)

    def worker_moved(
        self,
        model: str,
        unit: str,
        previous: WorkerState,
        state: WorkerState,
        reason: str,
        held_s: float,
        cause: str,
        sleep_level: int,
        phases: dict[str, float] | None,
        marks: dict[str, float],
    ) -> None:
        now = time.time()
        served: float | None = None
        if state in SERVING and previous not in SERVING:
            self._serving_since[unit] = now
        elif previous in SERVING and state not in SERVING:
            since = self._serving_since.pop(unit, None)
            served = None if since is None else now - since
        if state in TERMINAL:
            self._serving_since.pop(unit, None)
        leaving = previous in LIVE and state not in LIVE
        cold = previous is WorkerState.STARTING and state is WorkerState.READY
        self.record(
            Change(
                at=now,
                model=model,
                unit=unit,
                previous=previous.value,
                state=state.value,
                reason=reason,
                held_s=held_s,
                cause=cause,
                retired=state in (WorkerState.DRAINING, WorkerState.STOPPING)
                and (leaving or previous is WorkerState.SLEEPING),
                sleep_level=sleep_level,
                phases=phases if cold else None,
                marks=dict(marks) if cold else None,
                served_s=served,
            )
        )

    def check_failed(self, model: str, check: str) -> None:
        for listener in self.check_listeners:
            listener(model, check)

    def load_moved(self, model: str, previous: str, state: str, reason: str, held_s: float) -> None:
        self.record(
            Change(at=time.time(), model=model, unit=None, previous=previous, state=state, reason=reason, held_s=held_s)
        )
