"""The warm tier's choices carried out: a placement's victims evicted (each to
sleep or to stop, as :func:`ssw.loader.decide.tiers.choose` says), idle workers
put to sleep or stopped after their model's ``idle_ttl_s``, and whether a load
for batch work would evict a model in interactive use."""

from __future__ import annotations

import asyncio
import time

from ssw.common.states import ASLEEP, WorkerState
from ssw.errors import NoCapacity
from ssw.loader.decide import tiers
from ssw.loader.decide.placement import place
from ssw.loader.decide.vram import vram_need
from ssw.loader.models.registry import ModelSpec
from ssw.loader.workers.inventory import Inventory
from ssw.loader.workers.parts import Parts, Piece
from ssw.loader.workers.retire import Retirer, quiet_read
from ssw.loader.workers.table import Worker

IDLE_CHECK_S = 1.0


class Warm(Piece):
    def __init__(self, parts: Parts, inventory: Inventory, retirer: Retirer) -> None:
        super().__init__(parts)
        self.inventory = inventory
        self.retirer = retirer
        self.evictions = 0
        # model -> seconds its workers may stay idle, as a client last asked (Ollama's
        # keep_alive) while they are up: in place of idle_ttl_s until its last worker leaves;
        # negative: until evicted or unloaded.
        self.keep_alive: dict[str, float] = {}

    async def evict(self, units: tuple[str, ...], for_model: str, gpu: int) -> None:
        """Make the placement's victims give back their GPU memory: each sleeps or
        stops as :func:`ssw.loader.decide.tiers.choose` decides; a sleeper is stopped."""
        for unit in units:
            victim = self.table.get(unit)
            if victim is None:
                continue
            self.evictions += 1
            idle = time.time() - victim.last_used
            reason = f"evicted to make room for {for_model} on GPU {gpu}: least recently used, idle {idle:.0f} s"
            if victim.state in ASLEEP:
                self.retirer.retire(victim, reason, cause="evicted")
                continue
            choice = await self.tier_for(victim)
            self.retirer.retire(victim, f"{reason}; {_tier_text(choice)}", choice.level, cause="evicted")

    async def tier_for(self, worker: Worker) -> tiers.Choice:
        if not worker.sleep_mode:
            return tiers.Choice("stop", "sleep mode is off for this model")
        spec = self.catalog.models.get(worker.model)
        details = await quiet_read(self.systemd.details(worker.unit))
        wakes = {level: t for level in (1, 2) if (t := self.store.wake_seconds(worker.model, level)) is not None}
        victim = tiers.Victim(
            sleep_enabled=True,
            weights_bytes=spec.facts.weight_bytes if spec is not None else 0,
            ram_bytes=(details.memory_current or 0) if details is not None else 0,
            cold_start_s=self.store.load_seconds(worker.model),
            wake_s=wakes,
        )
        return tiers.choose(victim, self.retirer.ram_budget())

    def forget_keep_alive(self, model: str) -> None:
        """The model's last worker left: the keep_alive a client set was for that residency."""
        if self.keep_alive.pop(model, None) is not None:
            self.feed.changed()

    def idle_ttl(self, model: str) -> tuple[float | None, str]:
        """How long the model's workers may stay idle (None: for ever), and which setting says so."""
        if model in self.keep_alive:
            return self.keep_alive[model], "keep_alive"
        spec = self.catalog.models.get(model)
        return (spec.idle_ttl_s if spec is not None else None), "idle_ttl_s"

    async def set_keep_alive(self, model: str, seconds: float) -> list[str]:
        """A client's keep_alive for the model; 0 puts its ready workers to sleep or stops
        them now (each drains first: requests in flight finish). Pinned models keep their
        own settings. Returns the workers retired."""
        spec = self.catalog.models.get(model)
        if spec is None or spec.pinned:
            return []
        if seconds != 0:
            self.keep_alive[model] = seconds
            self.feed.changed()
            return []
        # 0 unloads what is up now; it does not stick (a later load keeps idle_ttl_s, as an
        # Ollama server's default keep_alive applies to a request that names none).
        self.keep_alive.pop(model, None)
        self.feed.changed()
        retired = []
        for worker in self.table.of_model(model):
            if worker.state is WorkerState.READY and worker.retirement is None and not worker.headless:
                choice = await self.tier_for(worker)
                self.retirer.retire(worker, f"keep_alive 0; {_tier_text(choice)}", choice.level, cause="keep_alive")
                retired.append(worker.unit)
        return retired

    async def idle_loop(self) -> None:
        """Workers of models with idle_ttl_s sleep (or stop) once idle that long."""
        while True:
            await asyncio.sleep(IDLE_CHECK_S)
            now = time.time()
            for worker in self.table:
                spec = self.catalog.models.get(worker.model)
                ttl, why = self.idle_ttl(worker.model)
                # A headless rank serves no requests here: its group's head goes idle for it.
                if spec is None or ttl is None or ttl < 0 or worker.state is not WorkerState.READY or worker.headless:
                    continue
                idle_since = max(worker.last_used, worker.state_since)
                if worker.retirement is not None or now - idle_since < ttl:
                    continue
                if spec.pinned and not worker.sleep_mode:
                    continue  # pinned models stay up; they may only sleep when models.yaml says so
                choice = await self.tier_for(worker)
                idle = f"idle {now - idle_since:.0f} s ({why} {ttl:g})"
                self.retirer.retire(worker, f"{idle}; {_tier_text(choice)}", choice.level, cause="idle")

    async def evicts_protected(self, spec: ModelSpec, protect_since: float) -> str | None:
        """Which workers used interactively since ``protect_since`` loading this model
        now would evict (None: none, or it needs no load, or it cannot be placed at all,
        which the load itself then reports)."""
        if self.table.live(spec.name):
            return None
        need = vram_need(spec, self.cfg.placement, self.store.vram_bytes(spec.name))
        policy, allowed, tp = self.cfg.placement.policy, spec.gpus or None, self.cfg.placement.tensor_parallel
        async with self.inventory.place_lock:
            gpus = await self.inventory.gpu_snapshot()
            devices = self.inventory.device_views(gpus)
            try:
                place(need, devices, self.inventory.residents(gpus, protect_since), policy, allowed, tp)
                return None
            except NoCapacity:
                pass
            try:
                plan = place(need, devices, self.inventory.residents(gpus), policy, allowed, tp)
            except NoCapacity:
                return None
        now = time.time()
        used = [
            f"{w.model} (used {now - w.interactive_used:.0f} s ago)"
            for unit in plan.evict
            if (w := self.table.get(unit)) is not None and w.interactive_used >= protect_since
        ]
        return ", ".join(used) or None


def _tier_text(choice: tiers.Choice) -> str:
    how = {"sleep1": "to sleep at level 1", "sleep2": "to sleep at level 2", "stop": "to stop"}[choice.tier]
    return f"{how}: {choice.reason}"
