"""Taking over the worker units already running when the loader starts, so a
restart never restarts a model: each one's record rebuilt from its unit's
``SSW_*`` environment and its health, and the retirements a previous loader had
begun finished."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ssw.common.states import WorkerState
from ssw.loader.systemd import engine
from ssw.loader.systemd.engine import RankPart
from ssw.loader.systemd.units import UNIT_GLOB, parse_unit_name
from ssw.loader.workers.parts import Parts, Piece
from ssw.loader.workers.retire import Retirer
from ssw.loader.workers.sockets import Sockets
from ssw.loader.workers.table import Worker

log = logging.getLogger(__name__)


class Adopter(Piece):
    def __init__(
        self,
        parts: Parts,
        retirer: Retirer,
        sockets: Sockets,
        load: Callable[..., Any],
        group_part: Callable[[str, int, str], Awaitable[RankPart | None]] | None = None,
    ) -> None:
        super().__init__(parts)
        self.retirer = retirer
        self.sockets = sockets
        self.load = load  # the conductor's: an adopted start's load continues
        # A rank of a model across hosts: its part, if its group's start still stands.
        self.group_part = group_part

    async def adopt(self) -> None:
        """Take over the worker units already running, so a restart never restarts a model,
        and finish taking down the ones a previous loader was retiring."""
        starting: set[str] = set()
        for status in await self.systemd.list_units(UNIT_GLOB):
            parsed = parse_unit_name(status.name)
            if parsed is None or status.active_state in ("inactive", "failed"):
                continue
            self.systemd.watch(status.name)
            details = await self.systemd.details(status.name)
            env = details.environment if details else {}
            try:
                model = env[engine.ENV_MODEL]
                replica = int(env[engine.ENV_REPLICA])
                socket = Path(env[engine.ENV_SOCKET])
                gpus = tuple(int(g) for g in env[engine.ENV_GPU].split(","))
                budget = int(env.get(engine.ENV_BUDGET, "0"))
            except (KeyError, ValueError):
                log.warning("%s: not adopted: it lacks ssw's SSW_* environment", status.name)
                self.systemd.unwatch(status.name)
                continue
            spec = self.catalog.models.get(model)
            part, stale = await self._part(model, env)
            leaving = status.active_state == "deactivating" or stale
            sleep_mode = env.get(engine.ENV_SLEEP) == "1"
            # vLLM says only that it sleeps, not at which level.
            asleep = sleep_mode and not leaving and await self.probes.is_sleeping(socket) is True
            assert details is not None
            worker = Worker(
                model=model,
                replica=replica,
                unit=status.name,
                socket=socket,
                gpus=gpus,
                budget_bytes=budget,
                state=WorkerState.STOPPING if leaving else WorkerState.SLEEPING if asleep else WorkerState.STARTING,
                state_reason="its group's start is over"
                if stale
                else "its unit was stopping when the loader started"
                if leaving
                else "adopted asleep"
                if asleep
                else "adopted",
                pinned=spec.pinned if spec else False,
                part=part,
                started_at=details.active_enter_us / 1e6 if details.active_enter_us else time.time(),
                adopted=True,
                unit_seen_active=True,
                sleep_mode=sleep_mode,
                slept_at=time.time() if asleep else 0.0,
            )
            if asleep:
                worker.released.set()  # its GPU memory was given back before the restart
            self.table.add(worker, f"adopted (model {model}, GPU {env[engine.ENV_GPU]}, socket {socket})")
            if leaving:
                self.tasks.spawn(self.retirer.stop_unit(worker))
            elif worker.headless:
                pass  # ready once its group is (the group keeper's next turn says)
            elif asleep:
                if self.retiring.reason(worker.unit) is not None:
                    self.retirer.retire(
                        worker,
                        (self.retiring.reason(worker.unit) or "") + " (resumed after a loader restart)",
                        cause="resumed",
                    )
            elif await self.probes.healthy(socket):
                self.table.move(worker, WorkerState.READY, "adopted, healthy")
                if spec is not None and spec.lora is not None:
                    # The adapters it had loaded are still loaded: take them over.
                    now = time.time()
                    worker.adapters = {a: now for a in await self.probes.adapters(socket) or set()}
                if (reason := self.retiring.reason(worker.unit)) is not None:
                    self.retirer.retire(worker, reason + " (resumed after a loader restart)", cause="resumed")
            elif self.retiring.reason(worker.unit) is not None:
                self.retirer.retire(worker, self.retiring.reason(worker.unit) or "", cause="resumed")
            else:
                starting.add(model)
        await self.retiring.keep_only(self.table.units())
        # A headless rank adopted while starting is the group keeper's, not a load's.
        starting -= {w.model for w in self.table if w.headless}
        await asyncio.to_thread(self.sockets.remove_stale)
        for model in sorted(starting):
            spec = self.catalog.models.get(model)
            if spec is not None:
                # Its load continues here: wait for the adopted worker, start missing replicas.
                self.load(spec, reason="adopted while starting")
                continue
            # No load can finish it, and nothing else would: it would hold its GPU budget,
            # unevictable, for ever.
            for worker in self.table.of_model(model):
                if worker.state is WorkerState.STARTING:
                    self.retirer.retire(
                        worker, f"adopted while starting, but model '{model}' is no longer in the registry"
                    )
        self.feed.changed()

    async def _part(self, model: str, env: dict[str, str]) -> tuple[RankPart | None, bool]:
        """(its part, stale): a rank unit's part in a start that still stands; stale when its
        start is over (or cannot be known: nothing is left half-running)."""
        if engine.ENV_RANK not in env:
            return None, False
        try:
            rank = int(env[engine.ENV_RANK])
        except ValueError:
            return None, True
        part = await self.group_part(model, rank, env.get(engine.ENV_GROUP, "")) if self.group_part else None
        return part, part is None
