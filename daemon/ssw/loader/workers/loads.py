"""Each model's load record (idle, loading, backing off, cooling down; with its
reason and deadline), and the only place one changes. Changes follow
:data:`ssw.common.states.LOAD_TRANSITIONS` and are logged once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ssw.common.contract import LoadView
from ssw.common.states import IllegalTransition, LoadState, check_load_move
from ssw.loader.decide.recovery import recent
from ssw.loader.workers.lifecycle import Lifecycle

log = logging.getLogger(__name__)


@dataclass
class LoadRecord:
    model: str
    state: LoadState = LoadState.IDLE
    reason: str = ""
    since: float = field(default_factory=time.time)
    deadline: float | None = None  # wall time: the end of a backoff or cooldown
    last_error: str | None = None
    failures: list[float] = field(default_factory=list)  # monotonic times, within the crash window
    # The load in progress, or the retry waiting for its deadline.
    task: asyncio.Task[Any] | None = None
    # Workers of the model that died while a load of it was in progress.
    died_during_load: int = 0
    # For batch work: workers used interactively since this wall time are not evicted for it.
    protect_since: float | None = None
    # The rank of the most urgent request this load is for (0 realtime, 1 interactive,
    # 2 batch): a realtime one may evict workers that became ready a short while ago, and
    # none evicts a worker that more urgent requests wait for.
    rank: int = 1

    def seconds_left(self) -> float:
        return max(self.deadline - time.time(), 0.0) if self.deadline is not None else 0.0

    def view(self) -> LoadView:
        return LoadView(
            state=self.state,
            reason=self.reason,
            since=round(self.since, 3),
            deadline=round(self.deadline, 3) if self.deadline is not None else None,
            last_error=self.last_error,
            recent_failures=len(recent(self.failures, time.monotonic())),
        )


class LoadBook:
    def __init__(self, on_change: Callable[[], None], lifecycle: Lifecycle | None = None) -> None:
        self._records: dict[str, LoadRecord] = {}
        self._on_change = on_change
        self._lifecycle = lifecycle

    def get(self, model: str) -> LoadRecord:
        rec = self._records.get(model)
        if rec is None:
            rec = self._records[model] = LoadRecord(model)
        if rec.state is LoadState.COOLING_DOWN and rec.seconds_left() <= 0:
            self.move(rec, LoadState.IDLE, "cooldown over")
        return rec

    def view(self, model: str) -> LoadView:
        """The model's record as published (a model never loaded has none yet)."""
        return self.get(model).view() if model in self._records else LoadView()

    def records(self) -> list[LoadRecord]:
        return [self.get(m) for m in list(self._records)]

    def move(self, rec: LoadRecord, state: LoadState, reason: str, deadline: float | None = None) -> None:
        if rec.state is state and state is LoadState.IDLE:
            rec.reason = reason
            return
        try:
            check_load_move(rec.state, state)
        except IllegalTransition:
            log.error("BUG: model %s: refused load %s -> %s (%s)", rec.model, rec.state.value, state.value, reason)
            raise
        until = f", until {time.strftime('%H:%M:%S', time.localtime(deadline))}" if deadline else ""
        level = logging.WARNING if state in (LoadState.BACKING_OFF, LoadState.COOLING_DOWN) else logging.INFO
        log.log(level, "model %s: load %s -> %s (%s%s)", rec.model, rec.state.value, state.value, reason, until)
        now = time.time()
        if self._lifecycle is not None:
            self._lifecycle.load_moved(rec.model, rec.state.value, state.value, reason + until, now - rec.since)
        rec.state = state
        rec.reason = reason
        rec.since = now
        rec.deadline = deadline
        self._on_change()
