"""Watching ready workers: ``/health`` every ``health.check_interval_s`` and a
1-token canary for those that had no traffic; an unhealthy worker leaves the
routing, and one that fails ``health.failures_to_replace`` checks of a kind in a
row is handed to ``on_hung`` (the conductor replaces it)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from ssw.common.probes import Canary
from ssw.common.states import WorkerState
from ssw.loader.workers.parts import Parts, Piece
from ssw.loader.workers.table import Worker

log = logging.getLogger(__name__)


class Health(Piece):
    def __init__(self, parts: Parts, on_hung: Callable[[Worker, str], Awaitable[None]]) -> None:
        super().__init__(parts)
        self.on_hung = on_hung

    async def health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health.check_interval_s)
            # A headless rank has no API: its group's head answers for it.
            watched = [
                w for w in self.table if w.state in (WorkerState.READY, WorkerState.UNHEALTHY) and not w.headless
            ]
            results = await asyncio.gather(*(self.probes.healthy(w.socket) for w in watched))
            for worker, ok in zip(watched, results, strict=True):
                self._checked(worker, "health", ok, "/health did not answer 200")

    async def canary_loop(self) -> None:
        interval = self.cfg.health.canary_interval_s
        while True:
            await asyncio.sleep(interval)
            now = time.time()
            for worker in self.table:
                if (
                    worker.state not in (WorkerState.READY, WorkerState.UNHEALTHY)
                    or not worker.canary
                    or worker.headless
                ):
                    continue
                failing = worker.check_failures.get("canary", 0) > 0
                if not failing and (now - worker.last_used < interval or now - worker.started_at < interval):
                    continue  # traffic or a recent start already showed it generates
                result, detail = await self.probes.canary(worker.socket, worker.model)
                if result is Canary.NOT_APPLICABLE:
                    worker.canary = False
                    log.info("%s: no canary for this model (%s)", worker.unit, detail)
                else:
                    self._checked(worker, "canary", result is Canary.PASSED, f"the 1-token canary failed: {detail}")

    def _checked(self, worker: Worker, kind: str, ok: bool, failure: str) -> None:
        """One check's result: unhealthy workers leave the routing, and one that fails
        health.failures_to_replace checks of a kind in a row is replaced."""
        if self.table.get(worker.unit) is not worker or worker.state not in (
            WorkerState.READY,
            WorkerState.UNHEALTHY,
        ):
            return
        if ok:
            worker.check_failures.pop(kind, None)
            if not worker.check_failures:
                self.table.move(worker, WorkerState.READY, f"{kind} check passed")
            return
        self.parts.lifecycle.check_failed(worker.model, kind)
        count = worker.check_failures[kind] = worker.check_failures.get(kind, 0) + 1
        limit = self.cfg.health.failures_to_replace
        self.table.move(worker, WorkerState.UNHEALTHY, f"{failure} ({count} of {limit})")
        if count >= limit:
            self.tasks.spawn(self.on_hung(worker, f"{failure} in {limit} checks in a row"))
