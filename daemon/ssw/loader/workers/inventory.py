"""What the GPUs hold now, and by whom: the snapshot (NVML, or simulated), each
worker's share of it, the devices as placement sees them (with memory reserved by
starting workers and memory that leaving workers still hold), and the residents
placement may evict. The place lock lives here: everything from a snapshot to a
reservation happens under it, so two loads never count the same free memory."""

from __future__ import annotations

import asyncio
import contextlib
import time

from ssw.common.states import ASLEEP, LEAVING, WorkerState
from ssw.errors import NoCapacity, SswError
from ssw.loader.decide.placement import DeviceView, Resident, place
from ssw.loader.decide.vram import GB, rank_share, vram_need
from ssw.loader.gpus import GpuInfo
from ssw.loader.models.registry import ModelSpec
from ssw.loader.workers.parts import Parts, Piece
from ssw.loader.workers.table import Worker

# On simulated GPUs a worker may say how much device memory it holds in this file
# next to its socket (the fake engine does; NVML measures real GPUs for itself).
SIMULATED_MEMORY_FILE = "device-memory"


class Inventory(Piece):
    def __init__(self, parts: Parts) -> None:
        super().__init__(parts)
        self.place_lock = asyncio.Lock()
        self.device_locks: dict[int, asyncio.Lock] = {}
        # Device memory the workers report on simulated GPUs (unit -> bytes), read with each snapshot.
        self.reported: dict[str, int] = {}

    def held(self, worker: Worker, gpus: list[GpuInfo]) -> int:
        """What a worker holds on one of its GPUs now."""
        if self.gpus.kind == "simulated":
            reported = self.reported.get(worker.unit)
            if reported is not None:
                return reported
            # Otherwise simulated memory is taken when the worker is up and given back
            # when it is gone or asleep.
            away = (WorkerState.STARTING, WorkerState.WAKING, WorkerState.SLEEPING)
            return worker.budget_bytes if worker.state not in away else 0
        per_gpu = [
            sum(p.used_bytes or 0 for p in g.processes if p.unit == worker.unit) for g in gpus if g.index in worker.gpus
        ]
        return max(per_gpu, default=0)

    def _simulated_use(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for w in self.table:
            held = self.held(w, [])
            for g in w.gpus:
                out[g] = out.get(g, 0) + held
        return out

    def _read_reported(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for w in self.table:
            with contextlib.suppress(OSError, ValueError):
                out[w.unit] = int((w.socket.parent / SIMULATED_MEMORY_FILE).read_text())
        return out

    async def gpu_snapshot(self) -> list[GpuInfo]:
        if self.gpus.kind == "simulated":
            self.reported = await asyncio.to_thread(self._read_reported)
        return await self.gpus.snapshot(self._simulated_use())

    def device_views(self, gpus: list[GpuInfo]) -> list[DeviceView]:
        pending: dict[int, int] = {}
        releasing: dict[int, int] = {}
        for w in self.table:
            if w.state in (WorkerState.STARTING, WorkerState.WAKING):
                # Reserved but not yet (fully) allocated: what NVML does not show yet.
                missing = max(w.budget_bytes - self.held(w, gpus), 0)
                for g in w.gpus:
                    pending[g] = pending.get(g, 0) + missing
            elif w.state in LEAVING:
                held = self.held(w, gpus) or w.budget_bytes
                for g in w.gpus:
                    releasing[g] = releasing.get(g, 0) + held
        return [
            DeviceView(
                g.index,
                g.memory_total,
                g.memory_used,
                pending.get(g.index, 0),
                min(releasing.get(g.index, 0), g.memory_used),
            )
            for g in gpus
        ]

    def residents(self, gpus: list[GpuInfo], protect_since: float | None = None) -> list[Resident]:
        """The workers holding GPU memory; with ``protect_since``, those used interactively
        since then are not evictable (a load for batch work)."""
        out = []
        residual = int(self.cfg.workers.sleep_residual_gb * GB)
        for w in self.table:
            asleep = w.state in ASLEEP
            held = self.held(w, gpus) if asleep else self.held(w, gpus) or w.budget_bytes
            evictable = w.state in (WorkerState.READY, WorkerState.UNHEALTHY, *ASLEEP) and not w.fixed
            if protect_since is not None and w.interactive_used >= protect_since:
                evictable = False
            # Until a load was measured, size stands in: about 1 s per GB from local disk.
            cost = self.store.load_seconds(w.model) or w.budget_bytes / GB
            # An awake worker with sleep mode may be put to sleep rather than stopped: it
            # then keeps its CUDA context on the GPU.
            keeps = residual if w.sleep_mode and not asleep else 0
            # Since it became ready (started or woken): a health blip does not make it young again.
            ready_for = time.time() - w.marks.get("healthy", 0.0)
            young = w.state is WorkerState.READY and ready_for < self.cfg.placement.min_residency_s
            waiters, rank = self.demand.waiting(w.unit)
            starting = w.state in (WorkerState.STARTING, WorkerState.WAKING) and not w.fixed
            out.append(
                Resident(
                    w.unit, w.gpus, held, w.last_used, evictable, cost, asleep, keeps, young, waiters, rank, starting
                )
            )
        return out

    def update_held(self, gpus: list[GpuInfo]) -> None:
        """What each worker holds now (NVML attribution); unknown stays None."""
        if self.gpus.kind != "nvml":
            return
        for w in self.table:
            if w.state not in (WorkerState.STARTING, WorkerState.WAKING):
                w.held_bytes = self.held(w, gpus) or None

    def preview(self, spec: ModelSpec, gpus: list[GpuInfo]) -> tuple[int, int] | None:
        """(bytes free after, workers evicted) if the model were loaded now; None when it
        could not be (the fleet compares hosts with it)."""
        # A model across hosts: what one rank of it takes here.
        need = rank_share(vram_need(spec, self.cfg.placement, self.store.vram_bytes(spec.name)), spec.span)
        devices = self.device_views(gpus)
        residents = self.residents(gpus)
        try:
            plan = place(
                need,
                devices,
                residents,
                self.cfg.placement.policy,
                spec.gpus or None,
                self.cfg.placement.tensor_parallel,
                width=spec.span.gpus_per_host if spec.span else 1,
            )
        except NoCapacity:
            return None
        device = next(d for d in devices if d.index == plan.gpus[0])
        freed = sum(r.held for r in residents if r.unit in plan.evict and device.index in r.gpus)
        return device.free_after_release + freed - plan.per_gpu_bytes, len(plan.evict)

    def check_room(self, new: Worker, totals: dict[int, int]) -> None:
        """The invariant placement guarantees, checked where it matters: the budgets of
        the workers whose processes run on a GPU never add up to more than it has."""
        for g in new.gpus:
            # Sleepers were seen to give their memory back before they counted as asleep.
            running = sum(
                w.budget_bytes
                for w in self.table
                if g in w.gpus and (w.unit_seen_active or w is new) and w.state not in ASLEEP
            )
            if running > totals[g]:
                raise SswError(
                    f"refusing to start {new.unit}: GPU {g} would hold {running / GB:.1f} GB of "
                    f"{totals[g] / GB:.1f} GB (a placement bug; please report it)"
                )

    async def wait_released(self, workers: list[Worker]) -> None:
        """Until each worker gave its GPU memory back: asleep (seen freed) or gone."""
        if workers:
            await asyncio.gather(*(w.released.wait() for w in workers))
