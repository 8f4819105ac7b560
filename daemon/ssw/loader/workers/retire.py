"""Taking workers down: drain (routing stops at once, requests in flight finish),
then sleep at a level (and see the GPU memory come free) or stop the unit; the
sleepers kept within their host-memory budget."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable
from typing import TypeVar

from ssw.common.states import ASLEEP, WorkerState
from ssw.errors import SswError, SystemdError
from ssw.loader.decide import tiers
from ssw.loader.decide.vram import GB
from ssw.loader.workers.inventory import Inventory
from ssw.loader.workers.parts import Parts, Piece
from ssw.loader.workers.table import Worker

log = logging.getLogger(__name__)
T = TypeVar("T")

# A drained worker shows no request in flight for this long before it is stopped:
# a request routed just before the gateway heard of the drain arrives meanwhile.
DRAIN_SETTLE_S = 0.5
DRAIN_POLL_S = 0.2
DRAINED = "drained"
FREED_POLL_S = 0.25


class Retirer(Piece):
    def __init__(self, parts: Parts, inventory: Inventory) -> None:
        super().__init__(parts)
        self.inventory = inventory
        self.host_memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

    def retire(self, worker: Worker, reason: str, sleep_level: int = 0, cause: str = "other") -> asyncio.Task[None]:
        """Stop routing to the worker at once, let its in-flight requests finish (up to
        workers.drain_timeout_s), then put it to sleep at ``sleep_level`` (1 or 2) or
        stop its unit (0). ``cause`` is why, in one word (lifecycle.CAUSES: a metric's
        label). Returns the task that does it."""
        if worker.retirement is not None:
            return worker.retirement
        worker.retire_cause = cause
        if worker.state in (WorkerState.READY, WorkerState.UNHEALTHY) and not worker.headless:
            worker.sleep_level = sleep_level if worker.sleep_mode else 0
            self.table.move(worker, WorkerState.DRAINING, reason)
        elif worker.state in (WorkerState.STARTING, WorkerState.WAKING, *ASLEEP) or worker.headless:
            # (A headless rank has nothing in flight of its own to drain: its head drained.)
            self.table.move(worker, WorkerState.STOPPING, reason)
        worker.retirement = self.tasks.spawn(self._finish_retiring(worker, reason))
        return worker.retirement

    async def _finish_retiring(self, worker: Worker, reason: str) -> None:
        try:
            if worker.state is WorkerState.DRAINING:
                if not worker.sleep_level:
                    # Kept on disk: a loader restarted meanwhile finishes the drain.
                    await self.retiring.add(worker.unit, reason)
                outcome = await self.drain(worker)
                if worker.sleep_level and outcome == DRAINED and await self._put_to_sleep(worker):
                    return
                if worker.sleep_level and outcome != DRAINED:
                    outcome += "; not put to sleep with requests in flight"
                worker.sleep_level = 0
                self.table.move(worker, WorkerState.STOPPING, outcome)
            await self.stop_unit(worker)
        finally:
            worker.retirement = None

    async def drain(self, worker: Worker) -> str:
        """Wait until the worker has nothing in flight (up to workers.drain_timeout_s). A
        worker that cannot say (its /metrics does not answer) is not taken for idle: it
        is waited for, within the same bound."""
        limit = self.cfg.workers.drain_timeout_s
        deadline = time.monotonic() + limit
        quiet_since: float | None = None
        in_flight: int | None = None
        while time.monotonic() < deadline and self.table.get(worker.unit) is worker:
            in_flight = await self.probes.in_flight(worker.socket)
            now = time.monotonic()
            if in_flight == 0:
                quiet_since = quiet_since if quiet_since is not None else now
                if now - quiet_since >= DRAIN_SETTLE_S:
                    return DRAINED
            else:
                quiet_since = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(worker.done), DRAIN_POLL_S)
        if self.table.get(worker.unit) is not worker:
            return "its unit ended while draining"
        if in_flight is None:
            return f"drain timed out after {limit:.0f} s: the worker did not say what it has in flight"
        return f"drain timed out after {limit:.0f} s with {in_flight} requests in flight"

    async def stop_unit(self, worker: Worker) -> None:
        """Stop the unit (SIGTERM; vLLM's --shutdown-timeout, then SIGKILL) and wait until it is gone."""
        try:
            await self.systemd.stop(worker.unit, timeout=self.cfg.workers.stop_timeout_s + 15)
        except SystemdError as exc:
            # It stays tracked as stopping: its unit's end (systemd kills it at
            # TimeoutStopSec) still takes it out of the table.
            log.error("%s: stop failed: %s", worker.unit, exc.message)
            return
        with contextlib.suppress(SystemdError):
            await self.systemd.reset_failed(worker.unit)
        # The stop job is done: the unit is inactive, whether or not its signal came yet.
        self.table.move(worker, WorkerState.FAILED if worker.failure else WorkerState.GONE, worker.failure or "stopped")

    async def wait_gone(self, workers: list[Worker]) -> None:
        if workers:
            await asyncio.gather(*(asyncio.shield(w.done) for w in workers))

    def _sleep_state(self, worker: Worker, reason: str) -> None:
        self.table.move(worker, WorkerState.SLEEPING, reason)
        self.tasks.spawn(self.describe(worker, f"asleep (level {worker.sleep_level or '?'})"))

    async def describe(self, worker: Worker, state: str) -> None:
        """Show the warm tier in `systemctl status` (the unit's description)."""
        spec = self.catalog.models.get(worker.model)
        text = f"ssw vLLM worker for {worker.model} (replica {worker.replica}, GPU {','.join(map(str, worker.gpus))})"
        if spec is not None:
            with contextlib.suppress(SystemdError):
                await self.systemd.set_description(worker.unit, f"{text}: {state}")

    async def _put_to_sleep(self, worker: Worker) -> bool:
        """Sleep a drained worker and see its GPU memory come free; False (with the
        reason logged) when either fails, and the caller stops the unit instead."""
        level = worker.sleep_level
        before = self.inventory.held(worker, await self.inventory.gpu_snapshot()) or worker.budget_bytes
        started = time.monotonic()
        why = await self.probes.sleep(worker.socket, level, self.cfg.workers.sleep_timeout_s)
        if why is None:
            why = await self._confirm_freed(worker, before)
        if why is None and not worker.sleep_level:
            why = "unloaded while it was going to sleep"
        if why is not None:
            log.warning("%s: not put to sleep (%s): stopping it instead", worker.unit, why)
            worker.state_reason = f"sleep failed: {why}"
            return False
        took = time.monotonic() - started
        worker.slept_at = time.time()
        held = self.inventory.held(worker, await self.inventory.gpu_snapshot())
        self._sleep_state(
            worker,
            f"asleep at level {level} after {took:.2f} s; {(before - held) / GB:.1f} GB of GPU memory freed "
            f"({held / GB:.2f} GB kept)",
        )
        self.tasks.spawn(self.keep_sleepers_in_budget())
        return True

    async def _confirm_freed(self, worker: Worker, before: int) -> str | None:
        """Wait until the GPU memory the sleeping worker gave back shows as free (NVML, or
        what a simulated worker reports); None once it does, else why not."""
        residual = int(self.cfg.workers.sleep_residual_gb * GB)
        limit = self.cfg.workers.freed_timeout_s
        deadline = time.monotonic() + limit
        held = before
        while True:
            gpus = await self.inventory.gpu_snapshot()
            if self.gpus.kind == "simulated" and worker.unit not in self.inventory.reported:
                # Nothing to measure: the engine's word is all there is.
                return None if await self.probes.is_sleeping(worker.socket) else "it does not say it sleeps"
            held = self.inventory.held(worker, gpus)
            if tiers.freed(before, held, residual):
                return None
            if time.monotonic() >= deadline:
                return (
                    f"its GPU memory did not come free within {limit:.0f} s (workers.freed_timeout_s): "
                    f"{held / GB:.2f} GB still held of {before / GB:.2f} GB"
                )
            await asyncio.sleep(FREED_POLL_S)

    async def keep_sleepers_in_budget(self) -> None:
        """Stop the least recently used sleepers while sleepers hold more host memory
        than the budget (placement.sleep_ram_gb or sleep_ram_fraction)."""
        asleep = self.table.asleep()
        for w in asleep:
            details = await quiet_read(self.systemd.details(w.unit))
            if details is not None and details.memory_current is not None:
                w.ram_bytes = details.memory_current
        budget = self.ram_budget()
        sleepers = [tiers.Sleeper(w.unit, w.ram_bytes or 0, max(w.slept_at, w.last_used), w.pinned) for w in asleep]
        total = sum(x.ram_bytes for x in sleepers)
        for unit in tiers.over_budget(sleepers, budget):
            worker = self.table.get(unit)
            if worker is not None and worker.state in ASLEEP:
                self.retire(
                    worker,
                    cause="ram_budget",
                    reason=f"stopped: sleepers hold {total / GB:.2f} GB of host memory, over the budget of "
                    f"{budget / GB:.2f} GB (placement.sleep_ram_gb); least recently used",
                )
        self.feed.changed()

    def ram_budget(self) -> int:
        p = self.cfg.placement
        return tiers.ram_budget(p.sleep_ram_gb, p.sleep_ram_fraction, self.host_memory)


async def quiet_read(call: Awaitable[T]) -> T | None:
    """A D-Bus read whose failure only costs a figure."""
    try:
        return await call
    except SswError:
        return None
