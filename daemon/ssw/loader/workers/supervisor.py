"""The loader's machinery, conducted: loads (one per model however often asked,
with backoff and cooldown as :func:`ssw.loader.decide.recovery.recover` decides),
unloads, recovery from workers that die or hang, and systemd's news of units.
Each step is carried out by a piece (:mod:`.inventory`, :mod:`.start`,
:mod:`.retire`, :mod:`.warm`, :mod:`.health`, :mod:`.adopt`, :mod:`.adapters`,
:mod:`.sockets`), all sharing one :class:`~ssw.loader.workers.parts.Parts`.
States change only through the worker table and the load book.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ssw.common.states import ASLEEP, LEAVING, LIVE, Failure, IllegalTransition, LoadState, WorkerState
from ssw.errors import LoadFailed, ModelBusy, NoCapacity, SswError, SystemdError, WorkerNotFound
from ssw.loader.decide.recovery import recent, recover
from ssw.loader.group_board import GroupBoard
from ssw.loader.models.registry import ModelSpec
from ssw.loader.workers.adapters import Adapters
from ssw.loader.workers.adopt import Adopter
from ssw.loader.workers.groups import Groups
from ssw.loader.workers.health import Health
from ssw.loader.workers.inventory import Inventory
from ssw.loader.workers.loads import LoadRecord
from ssw.loader.workers.parts import Parts, Piece
from ssw.loader.workers.retire import Retirer
from ssw.loader.workers.sockets import Sockets
from ssw.loader.workers.start import JOURNAL_SEPARATOR, Starter
from ssw.loader.workers.table import Worker, load_phases
from ssw.loader.workers.warm import Warm

log = logging.getLogger(__name__)


class Supervisor(Piece):
    def __init__(
        self,
        parts: Parts,
        on_load_result: Callable[[str, str, float], None] | None = None,
        on_check_failed: Callable[[str, str], None] | None = None,
    ) -> None:
        super().__init__(parts)
        self.inventory = Inventory(parts)
        self.sockets = Sockets(parts)
        self.retirer = Retirer(parts, self.inventory)
        self.warm = Warm(parts, self.inventory, self.retirer)
        self.starter = Starter(
            parts, self.inventory, self.sockets, self.warm, self.retirer, on_load_result, on_check_failed
        )
        self.health = Health(parts, self._replace)
        # Models across hosts: only in a fleet (a host on its own refuses to load one).
        self.groups = (
            Groups(parts, GroupBoard(self.cfg.fleet), self.starter, self.retirer, self._group_broke)
            if self.cfg.fleet.enabled
            else None
        )
        self.adopter = Adopter(
            parts, self.retirer, self.sockets, self.load, self.groups.adopted if self.groups else None
        )
        self.adapters = Adapters(parts, self.load)
        self.table.on_leave = self._left
        self.systemd.on_state_change(self._on_unit_state)

    async def start(self) -> None:
        await self.sockets.prepare()
        await self.adopter.adopt()
        self.tasks.spawn(self.health.health_loop())
        self.tasks.spawn(self.warm.idle_loop())
        if self.groups is not None:
            self.tasks.spawn(self.groups.run())
        if self.cfg.health.canary_interval_s > 0:
            self.tasks.spawn(self.health.canary_loop())

    async def close(self) -> None:
        """Stop watching; workers keep running (a restarted loader adopts them)."""
        await self.tasks.close()
        await self.probes.close()
        if self.groups is not None:
            await self.groups.board.close()

    def load(
        self,
        spec: ModelSpec,
        gpu: int | None = None,
        reason: str = "requested",
        evict: bool = True,
        protect_since: float | None = None,
        rank: int = 1,
    ) -> asyncio.Future[list[Worker]]:
        """Bring the model's replicas up: one load per model however often it is asked
        (single flight), never before a backoff ends, never during a cooldown; with
        ``evict`` off, only where free memory holds it; with ``protect_since``, never
        evicting a worker used interactively since then; ``rank``, the priority of the
        request it is for (a realtime one evicts a worker within placement.min_residency_s
        of becoming ready if it must)."""
        rec = self.loads.get(spec.name)
        if rank < rec.rank:
            rec.rank = rank  # a start still to be placed, of this load, may use it
        if rec.state in (LoadState.LOADING, LoadState.BACKING_OFF) and rec.task is not None:
            return rec.task
        live = self.table.live(spec.name)
        if len(live) >= spec.replicas and all(w.state is WorkerState.READY for w in live):
            done: asyncio.Future[list[Worker]] = asyncio.get_running_loop().create_future()
            done.set_result(live)
            return done
        if rec.state is LoadState.COOLING_DOWN:
            raise LoadFailed.cooling_down(spec.name, rec.seconds_left(), rec.last_error or rec.reason)
        self.loads.move(rec, LoadState.LOADING, reason)
        rec.rank = rank
        rec.protect_since = protect_since
        rec.task = self.tasks.spawn(self._load(spec, gpu, evict))
        return rec.task

    async def _load(self, spec: ModelSpec, gpu: int | None = None, evict: bool = True) -> list[Worker]:
        rec = self.loads.get(spec.name)
        if spec.is_adapter:
            try:
                attached = await self.adapters.load(spec)
            except SswError as exc:
                rec.last_error = exc.message
                self.loads.move(rec, LoadState.IDLE, f"{Failure.START_FAILED.value}: {exc.message}")
                raise
            rec.last_error = None
            self.loads.move(rec, LoadState.IDLE, "ready")
            return attached
        rec.died_during_load = 0
        live = self.table.live(spec.name)
        have = {w.replica for w in live}
        # A replica that sleeps is woken rather than started again.
        asleep = {w.replica: w for w in self.table.asleep(spec.name) if w.replica not in have}
        jobs: list[Awaitable[Worker]] = [
            self.starter.wake(spec, asleep[r], gpu) if r in asleep else self.starter.start_replica(spec, r, gpu, evict)
            for r in range(1, spec.replicas + 1)
            if r not in have
        ]
        jobs += [self.starter.await_adopted(w) for w in live if w.state is WorkerState.STARTING]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for err in errors:
            if not isinstance(err, Exception):
                raise err  # cancelled (unloaded) or shutting down
        ready = self.table.ready(spec.name)
        # A move the lifecycle refused (a race with a stop, logged as a BUG where it
        # happened) is ssw's own fault, never counted against the model.
        interrupted = [e for e in errors if isinstance(e, IllegalTransition)]
        errors = [e for e in errors if not isinstance(e, IllegalTransition)]
        if not errors and not rec.died_during_load:
            rec.last_error = None
            if interrupted and len(ready) < spec.replicas:
                self.loads.move(rec, LoadState.IDLE, f"interrupted: {interrupted[0]}")
                if not ready:
                    raise LoadFailed(f"loading {spec.name} was interrupted; ask again", retry_after_s=1)
                return ready
            self.loads.move(rec, LoadState.IDLE, "ready")
            return ready
        if errors:
            err = errors[0]
            message = err.message if isinstance(err, SswError) else f"{type(err).__name__}: {err}"
            failure = Failure.NO_ROOM if all(isinstance(e, NoCapacity) for e in errors) else Failure.START_FAILED
        else:
            message = "a worker died while the model was loading"
            failure = Failure.DIED
        if ready:
            message = f"{len(ready)} of {spec.replicas} replicas ready: {message}"
        self._recover(spec, failure, message)
        if ready:
            return ready
        if failure is Failure.NO_ROOM:
            raise NoCapacity(message)
        raise LoadFailed(f"loading {spec.name} failed: {message}", retry_after_s=self._retry_after(rec))

    @staticmethod
    def _retry_after(rec: LoadRecord) -> int | None:
        return max(int(rec.seconds_left() + 0.999), 1) if rec.deadline else None

    def _recover(self, spec: ModelSpec, failure: Failure, message: str) -> None:
        """Apply the lifecycle's decision after a failure: retry after a backoff, cool down, or give up."""
        rec = self.loads.get(spec.name)
        now = time.monotonic()
        earlier = recent(rec.failures, now)
        rec.failures = [*earlier, now]
        rec.last_error = message
        decision = recover(failure, spec.pinned, len(earlier), self.cfg.placement)
        # The record's reason stays one line; last_error keeps the journal's tail.
        why = f"{failure.value}: {message.split(JOURNAL_SEPARATOR, 1)[0]}"
        if decision.action == "retry":
            deadline = time.time() + decision.delay_s
            self.loads.move(
                rec, LoadState.BACKING_OFF, f"retry {len(earlier) + 1} in {decision.delay_s:.1f} s, {why}", deadline
            )
            rec.task = self.tasks.spawn(self._retry(spec, deadline))
        elif decision.action == "cool_down":
            self.loads.move(rec, LoadState.COOLING_DOWN, f"{decision.reason}; {why}", time.time() + decision.delay_s)
            rec.task = None
        else:
            self.loads.move(rec, LoadState.IDLE, why)
            rec.task = None

    async def _retry(self, spec: ModelSpec, deadline: float) -> list[Worker]:
        await asyncio.sleep(max(deadline - time.time(), 0.0))
        rec = self.loads.get(spec.name)
        self.loads.move(rec, LoadState.LOADING, "backoff over, retrying")
        return await self._load(self.catalog.models.get(spec.name, spec))

    async def _replace(self, worker: Worker, why: str) -> None:
        """Kill a worker that hung (a frozen process answers no SIGTERM) and bring its model back."""
        worker.failure = f"hung: {why}"
        worker.retire_cause = "replaced"
        self.table.move(worker, WorkerState.STOPPING, f"replacing it: {why}")
        with contextlib.suppress(SystemdError):
            await self.systemd.kill(worker.unit, signal.SIGKILL)
        await self.retirer.stop_unit(worker)
        spec = self.catalog.models.get(worker.model)
        if spec is not None:
            self._worker_lost(spec, Failure.HUNG, f"{worker.unit} was replaced: {why}")

    def _group_broke(self, head: Worker, message: str) -> None:
        spec = self.catalog.models.get(head.model)
        if spec is not None:
            self._worker_lost(spec, Failure.DIED, message)

    def _worker_lost(self, spec: ModelSpec, failure: Failure, message: str) -> None:
        rec = self.loads.get(spec.name)
        if rec.state is LoadState.LOADING:
            rec.died_during_load += 1  # its load decides when it ends
        elif rec.state is LoadState.IDLE:
            self._recover(spec, failure, message)

    def _on_unit_state(self, unit: str, active: str, sub: str) -> None:
        worker = self.table.get(unit)
        if worker is None:
            return
        if active in ("activating", "active", "reloading"):
            worker.unit_seen_active = True
            return
        if active not in ("inactive", "failed") or not worker.unit_seen_active:
            return
        if worker.state in LEAVING:
            end = WorkerState.FAILED if worker.failure and worker.state is WorkerState.STOPPING else WorkerState.GONE
            self.table.move(worker, end, worker.failure or f"its unit is {active}")
        else:
            self.table.move(
                worker, WorkerState.FAILED, f"the unit went {active}/{sub} unexpectedly; see 'journalctl -u {unit}'"
            )

    def _left(self, worker: Worker, previous: WorkerState, state: WorkerState) -> None:
        """A worker left the table: let go of everything that was its."""
        self.systemd.unwatch(worker.unit)
        self.probes.forget(worker.socket)
        self.sockets.remove_dir(worker.socket)  # inline, for the reason in _start_replica
        self.tasks.spawn(self.retiring.discard(worker.unit))
        if not self.table.of_model(worker.model):
            self.warm.forget_keep_alive(worker.model)
        if self.groups is not None:
            self.groups.left(worker, state)
        if worker.headless:
            return  # its group's head loads it again, with a new group
        if state is WorkerState.FAILED and previous in (WorkerState.READY, WorkerState.UNHEALTHY):
            spec = self.catalog.models.get(worker.model)
            if spec is not None:
                kind = "pinned model" if spec.pinned else "model"
                log.warning("%s %s: worker died; restarting it (%s)", kind, spec.name, worker.unit)
                self._worker_lost(spec, Failure.DIED, f"{worker.unit} died: {worker.state_reason}")

    def touch(self, unit: str, when: float, interactive: float | None = None) -> None:
        worker = self.table.get(unit)
        if worker is None:
            return
        if when > worker.last_used:
            worker.last_used = min(when, time.time())
        if interactive is not None and interactive > worker.interactive_used:
            worker.interactive_used = min(interactive, time.time())

    def touch_adapters(self, unit: str, used: dict[str, float]) -> None:
        worker = self.table.get(unit)
        if worker is None:
            return
        for name, when in used.items():
            if name in worker.adapters and when > worker.adapters[name]:
                worker.adapters[name] = min(when, time.time())

    async def trial(self, spec: ModelSpec, options: dict[str, Any], key: str) -> dict[str, Any]:
        """A cold start of a model that is not up, with other start options, timed phase by
        phase and recorded; its workers are stopped afterwards. A failed trial is not held
        against the model (no cooldown)."""
        if self.table.of_model(spec.name) or self.loads.get(spec.name).state is not LoadState.IDLE:
            raise ModelBusy(f"model '{spec.name}' is loaded or loading: unload it before timing a cold start")
        tried = dataclasses.replace(spec, **options)
        try:
            workers = await self.load(tried, reason=f"cold-start trial with {key}")
        except SswError:
            rec = self.loads.get(spec.name)
            if rec.state is LoadState.COOLING_DOWN:
                self.loads.move(rec, LoadState.IDLE, "a cold-start trial failed: not held against the model")
            raise
        worker = workers[0]
        seconds = worker.marks["healthy"] - worker.marks["requested"]
        result = {
            "model": spec.name,
            "options": key,
            "seconds": round(seconds, 3),
            "phases_s": load_phases(worker.marks),
        }
        await self.store.record_cold_start(spec.name, key, seconds)
        await self.unload(spec.name)
        return result

    async def unload_unit(self, unit: str) -> list[str]:
        """Retire one worker by its unit name (one whose model has left the registry, say)."""
        worker = self.table.get(unit)
        if worker is None:
            raise WorkerNotFound(f"no worker unit '{unit}'")
        if worker.state in LIVE or worker.state in ASLEEP:
            self.retirer.retire(worker, "unload requested", cause="unload")
        await self.retirer.wait_gone([worker])
        return [worker.unit]

    async def unload(self, model: str) -> list[str]:
        """Cancel the model's load or retry, and retire its workers; answers once they are gone."""
        rec = self.loads.get(model)
        pending = rec.task is not None and not rec.task.done()
        if rec.task is not None:
            rec.task.cancel()
            rec.task = None
        if rec.state is not LoadState.IDLE:
            self.loads.move(rec, LoadState.IDLE, "unloaded")
        spec = self.catalog.models.get(model)
        if spec is not None and spec.is_adapter:
            units = await self.adapters.unload(spec)
            if not units and not pending:
                raise WorkerNotFound(f"adapter '{model}' is not loaded")
            return units
        workers = self.table.of_model(model)
        if not workers and not pending:
            raise WorkerNotFound(f"model '{model}' is not loaded")
        ranks = [w for w in workers if w.headless]
        if ranks and self.groups is not None and await self.groups.unload_from_member(ranks[0]):
            # Unloaded where it has a headless rank: the whole group goes, its head first
            # (which drains its requests); this host's rank stops with the group's record.
            workers = [w for w in workers if not w.headless]
            await self.retirer.wait_gone(ranks)
        for worker in workers:
            if worker.state in LIVE or worker.state in ASLEEP:
                self.retirer.retire(worker, "unload requested", cause="unload")
            elif worker.state is WorkerState.DRAINING and worker.sleep_level:
                worker.sleep_level = 0  # unloaded while draining to sleep: stopped instead
        await self.retirer.wait_gone(workers)
        return [w.unit for w in [*ranks, *workers]]
