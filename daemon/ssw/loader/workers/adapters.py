"""LoRA adapters: served by their base model's workers, loaded into each at run
time (the least recently used one unloaded first when a worker holds
``max_loras``), one change at a time per worker."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from ssw.errors import LoadFailed, SswError
from ssw.loader.models.registry import ModelSpec
from ssw.loader.workers.parts import Parts, Piece
from ssw.loader.workers.table import Worker

log = logging.getLogger(__name__)


class Adapters(Piece):
    def __init__(self, parts: Parts, load: Callable[..., Awaitable[list[Worker]]]) -> None:
        super().__init__(parts)
        self.load_base = load  # the conductor's: one load of the base however many adapters ask

    async def load(self, spec: ModelSpec) -> list[Worker]:
        """An adapter is served by its base's workers: the base loaded (one load however
        many ask), then the adapter loaded into each of its ready workers."""
        base = self.catalog.models.get(spec.base or "")
        if base is None:
            raise LoadFailed(f"{spec.name}: its base model '{spec.base}' is not on this host")
        workers = await asyncio.shield(self.load_base(base, reason=f"for its adapter {spec.name}"))
        results = await asyncio.gather(*(self._attach(w, spec, base) for w in workers), return_exceptions=True)
        attached = [w for w, r in zip(workers, results, strict=True) if r is None]
        if not attached:
            err = next(r for r in results if isinstance(r, BaseException))
            if isinstance(err, SswError):
                raise err
            raise LoadFailed(f"loading adapter {spec.name}: {type(err).__name__}: {err}")
        return attached

    async def _attach(self, worker: Worker, spec: ModelSpec, base: ModelSpec) -> None:
        """Load the adapter into one worker, first unloading its least recently used
        adapter when it holds max_loras already. One change at a time per worker, so
        concurrent requests for an adapter load it once."""
        max_loras = base.lora[0] if base.lora else 0
        if not max_loras:
            raise LoadFailed(f"{spec.name}: {worker.unit} runs without LoRA (restart it: the adapter is new)")
        timeout = self.cfg.workers.wake_timeout_s
        async with worker.adapter_lock:
            if spec.name in worker.adapters:
                return
            while len(worker.adapters) >= max_loras:
                victim = min(worker.adapters, key=lambda a: worker.adapters[a])
                why = await self.probes.unload_adapter(worker.socket, victim, timeout)
                if why is not None and "404" not in why:
                    raise LoadFailed(f"unloading adapter {victim} from {worker.unit} to make room: {why}")
                del worker.adapters[victim]
                log.info("%s: adapter %s unloaded (least recently used; max_loras %d)", worker.unit, victim, max_loras)
            started = time.monotonic()
            why = await self.probes.load_adapter(worker.socket, spec.name, spec.path, timeout)
            if why is not None:
                raise LoadFailed(f"loading adapter {spec.name} into {worker.unit}: {why}")
            worker.adapters[spec.name] = time.time()
            log.info("%s: adapter %s loaded in %.2f s", worker.unit, spec.name, time.monotonic() - started)
            self.feed.changed()

    async def unload(self, spec: ModelSpec) -> list[str]:
        holders = [w for w in self.table if spec.name in w.adapters]
        for worker in holders:
            async with worker.adapter_lock:
                await self.probes.unload_adapter(worker.socket, spec.name, self.cfg.workers.wake_timeout_s)
                worker.adapters.pop(spec.name, None)
        self.feed.changed()
        return [w.unit for w in holders]
