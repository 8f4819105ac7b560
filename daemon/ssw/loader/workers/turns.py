"""A load's turn to evict. Placement names the victims whose in-flight requests are
as urgent as the load's (``drain``) and refuses a swap under more urgent ones
(:class:`~ssw.errors.SwapDeferred`); here the load waits, outside the place lock,
for what those decisions ask: the victims serve their queue first (up to
``placement.drain_queue_before_swap`` more requests each, or until idle), or the
more urgent requests end. Either wait ends by ``placement.swap_wait_s``: a drained
victim is then evicted; a deferred swap fails (the load is retried as any failed
load is, and the requests held for it hear why)."""

from __future__ import annotations

import logging
import time

from ssw.common.states import WorkerState
from ssw.errors import SwapDeferred
from ssw.loader.workers.parts import Parts, Piece

log = logging.getLogger(__name__)

POLL_S = 1.0  # the longest wait between two looks, should a gateway's report not come


class Turn(Piece):
    def __init__(self, parts: Parts, model: str) -> None:
        super().__init__(parts)
        self.model = model
        self.deadline = time.monotonic() + self.cfg.placement.swap_wait_s
        self.served: set[str] = set()  # victims that had their turn: evicted when next chosen
        self._deferred_logged = False

    def to_drain(self, drain: tuple[str, ...]) -> list[str]:
        """The victims that serve their queue before this load evicts them."""
        if not self.cfg.placement.drain_queue_before_swap or time.monotonic() >= self.deadline:
            return []
        return [u for u in drain if u not in self.served]

    async def let_serve(self, units: list[str]) -> None:
        bound = self.cfg.placement.drain_queue_before_swap
        base = {u: self.demand.served(u) for u in units}
        verb = "serve their queues" if len(units) > 1 else "serves its queue"
        log.info("%s: %s %s first (up to %d more requests) before the swap", self.model, ", ".join(units), verb, bound)
        while (left := self.deadline - time.monotonic()) > 0:
            busy = [u for u in units if self._serving(u) and self.demand.served(u) - base[u] < bound]
            if not busy:
                break
            await self.demand.wait_change(min(POLL_S, left))
        self.served.update(units)

    def _serving(self, unit: str) -> bool:
        worker = self.table.get(unit)
        return worker is not None and worker.state is WorkerState.READY and self.demand.waiting(unit)[0] > 0

    async def defer(self, exc: SwapDeferred) -> None:
        """Wait a while for the more urgent requests; past swap_wait_s, the swap fails."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            exc.message += f"; waited placement.swap_wait_s ({self.cfg.placement.swap_wait_s:.0f} s)"
            raise exc
        if not self._deferred_logged:
            log.info("%s: the swap waits: %s", self.model, exc.message)
            self._deferred_logged = True
        await self.demand.wait_change(min(POLL_S, left))
