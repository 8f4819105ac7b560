"""The requests this gateway process has in flight on each worker, by priority, and
how many each worker has answered. Routing reads the counts (realtime requests go
to the replica with the fewest); the loader hears them as each worker's demand (who
waits for a worker it might evict); and, while realtime traffic is about on a model,
they cap the interactive and batch requests in flight on each of its workers
(``gateway.non_realtime_cap_per_worker``) so that a realtime request finds a free
slot in vLLM's running batch instead of queueing behind a full one (vLLM's priority
scheduling orders its waiting queue; it does not free a running slot)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

REALTIME = "realtime"
RECHECK_S = 1.0  # a capped request looks again at least this often (the window may close)


class InFlight:
    def __init__(
        self, cap: int | None = None, realtime_window_s: float = 30.0, on_change: Callable[[], None] | None = None
    ) -> None:
        self._by: dict[str, dict[str, int]] = {}  # unit -> priority -> requests
        self.served: dict[str, int] = {}  # unit -> requests answered, ever
        self.cap = cap
        self.realtime_window_s = realtime_window_s
        self._realtime_at: dict[str, float] = {}  # model -> monotonic time of its last realtime request
        self._freed: dict[str, asyncio.Event] = {}  # unit -> set when a request on it ends
        self.on_change = on_change

    def count(self, unit: str) -> int:
        return sum(self._by.get(unit, {}).values())

    def total(self) -> int:
        return sum(sum(by.values()) for by in self._by.values())

    def demand(self) -> dict[str, dict[str, int]]:
        """unit -> priority -> requests, for the workers with any in flight."""
        return {u: {p: n for p, n in by.items() if n} for u, by in self._by.items() if any(by.values())}

    def capped(self, unit: str, model: str, priority: str) -> bool:
        """Whether one more request of this priority must wait before it is sent to the worker."""
        if self.cap is None or priority == REALTIME:
            return False
        by = self._by.get(unit, {})
        realtime_about = by.get(REALTIME, 0) > 0 or (
            time.monotonic() - self._realtime_at.get(model, -1e9) < self.realtime_window_s
        )
        return realtime_about and self.count(unit) - by.get(REALTIME, 0) >= self.cap

    async def enter(self, unit: str, model: str, priority: str, cap: bool = True) -> None:
        """Count a request in; a capped one waits for a slot on the worker first. Without
        ``cap`` (a request relayed to another host, whose gateway caps its own workers),
        it is only counted."""
        if priority == REALTIME:
            self._realtime_at[model] = time.monotonic()
        while cap and self.capped(unit, model, priority):
            event = self._freed.setdefault(unit, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), RECHECK_S)
        by = self._by.setdefault(unit, {})
        by[priority] = by.get(priority, 0) + 1
        self._changed()

    def leave(self, unit: str, priority: str, answered: bool) -> None:
        by = self._by.get(unit, {})
        by[priority] = max(by.get(priority, 0) - 1, 0)
        if not any(by.values()):
            self._by.pop(unit, None)
        if answered:
            self.served[unit] = self.served.get(unit, 0) + 1
        event = self._freed.pop(unit, None)
        if event is not None:
            event.set()  # every waiter looks again; those still capped wait on a new event
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()
