"""Bringing one replica up: a cold start (read the inventory, plan, evict,
reserve and start its transient unit, all decided under the place lock, then
wait until it answers healthy) or a wake where it sleeps; and a start that fails
or is cancelled leaves nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from ssw.common.probes import Canary
from ssw.common.routes import inference_paths
from ssw.common.states import ASLEEP, WorkerState
from ssw.errors import LoadFailed, SswError, SwapDeferred
from ssw.loader.decide.plan import StartPlan, plan_start, plan_wake
from ssw.loader.decide.vram import GB, rank_share, vram_need
from ssw.loader.models.registry import ModelSpec
from ssw.loader.systemd import engine, journal
from ssw.loader.systemd.engine import RankPart
from ssw.loader.systemd.units import UNIT_GLOB, parse_unit_name, socket_path
from ssw.loader.workers.inventory import Inventory
from ssw.loader.workers.parts import Parts, Piece
from ssw.loader.workers.retire import Retirer
from ssw.loader.workers.sockets import Sockets
from ssw.loader.workers.table import Worker, describe_phases
from ssw.loader.workers.turns import Turn
from ssw.loader.workers.warm import Warm

log = logging.getLogger(__name__)

JOURNAL_LINES_ON_FAILURE = 8
JOURNAL_SEPARATOR = " | last log lines: "
ROUTES_PROBE_DELAY_S = 5.0


class GroupHooks(Protocol):
    async def form(self, spec: ModelSpec) -> RankPart: ...

    async def ready(self, head: Worker) -> None: ...


class NoGroups:
    """A host outside a fleet: no model can span hosts from it."""

    async def form(self, spec: ModelSpec) -> RankPart:
        raise LoadFailed(f"{spec.name} spans {spec.span.hosts if spec.span else 1} hosts, but this host is in no fleet")

    async def ready(self, head: Worker) -> None:
        return None


class Starter(Piece):
    def __init__(
        self,
        parts: Parts,
        inventory: Inventory,
        sockets: Sockets,
        warm: Warm,
        retirer: Retirer,
        on_load_result: Callable[[str, str, float], None] | None = None,
        on_check_failed: Callable[[str, str], None] | None = None,
    ) -> None:
        super().__init__(parts)
        self.inventory = inventory
        self.sockets = sockets
        self.warm = warm
        self.retirer = retirer
        # (model, "ready" or "failed", seconds from unit start to healthy or failure)
        self.on_load_result = on_load_result
        # (model, "wake" or "start"): a worker's known answer differed
        self.on_check_failed = on_check_failed
        # Models across hosts: forming a group as its head, and saying it is ready.
        self.groups: GroupHooks = NoGroups()

    async def start_replica(
        self, spec: ModelSpec, replica: int, gpu: int | None = None, evict: bool = True, part: RankPart | None = None
    ) -> Worker:
        """Start one worker; for a model across hosts, its head (``part`` None: the group is
        formed here, once this host's place is decided) or a headless rank of a group
        another host formed (``part``)."""
        need = rank_share(vram_need(spec, self.cfg.placement, self.store.vram_bytes(spec.name)), spec.span)
        allowed = (gpu,) if gpu is not None else (spec.gpus[(replica - 1) % len(spec.gpus)],) if spec.gpus else None
        turn = Turn(self.parts, spec.name)
        while True:
            deferred: SwapDeferred | None = None
            drain: list[str] = []
            async with self.inventory.place_lock:
                # Read, decide and do under one lock, from the snapshot to the reservation:
                # two loads can never both count the same free memory.
                gpus = await self.inventory.gpu_snapshot()
                rec = self.loads.get(spec.name)
                try:
                    plan = plan_start(
                        spec.name,
                        replica,
                        spec.replicas,
                        need,
                        self.inventory.device_views(gpus),
                        self.inventory.residents(gpus, rec.protect_since) if evict else [],
                        self.cfg.placement.policy,
                        allowed,
                        self.cfg.placement.tensor_parallel,
                        self.table.units() | await self._loaded_units(spec.name),
                        rec.rank,
                        spec.span.gpus_per_host if spec.span else 1,
                    )
                except SwapDeferred as exc:
                    deferred = exc
                else:
                    drain = turn.to_drain(plan.drain)
                    if not drain:
                        if spec.span is not None and part is None:
                            # This host heads it: the other hosts are chosen and claimed now,
                            # before anything is evicted here for it.
                            part = await self.groups.form(spec)
                        worker = await self._reserve(spec, replica, plan, rec.since, part)
                        break
            # Outside the lock: the victims serve on, and other loads may place meanwhile.
            if deferred is not None:
                await turn.defer(deferred)
            else:
                await turn.let_serve(drain)
        name = plan.unit
        try:
            totals = {g.index: g.memory_total for g in gpus}
            nodes = tuple(g.device_node for g in gpus if g.index in plan.gpus and g.device_node)
            # vLLM checks free device memory at start and profiles it: never start
            # while a worker on these GPUs is still shutting down.
            await self.inventory.wait_released(self.table.leaving_on(plan.gpus))
            async with contextlib.AsyncExitStack() as stack:
                # ...nor while another one starts there.
                for g in sorted(plan.gpus):
                    await stack.enter_async_context(self.inventory.device_locks.setdefault(g, asyncio.Lock()))
                log.info(
                    "%s: starting (GPU %s, %.1f GB per GPU from %s)",
                    name,
                    ",".join(map(str, plan.gpus)),
                    plan.per_gpu_bytes / GB,
                    need.source,
                )
                self.table.mark(worker, "evicted")
                self.inventory.check_room(worker, totals)
                # A few metadata calls on /run, done inline: in a thread, a cancelled
                # start would leave them running behind the next worker's back.
                socket = self.sockets.make_dir(name)
                transient = engine.worker_unit(
                    self.cfg,
                    spec,
                    name,
                    replica,
                    socket,
                    plan.gpus,
                    plan.per_gpu_bytes,
                    totals[plan.gpus[0]],
                    # vLLM on the CPU (simulated GPUs) sizes its KV cache from VLLM_CPU_KVCACHE_SPACE.
                    need.kv_bytes if self.gpus.kind == "nvml" else None,
                    nodes,
                    worker.sleep_mode,
                    part,
                )
                await self.systemd.reset_failed(name)
                # Shielded: cancelling the await does not cancel systemd's job. A
                # cancelled load waits for the unit to exist, then stops it.
                starting = asyncio.ensure_future(self.systemd.start_transient(transient))
                try:
                    await asyncio.shield(starting)
                except asyncio.CancelledError:
                    with contextlib.suppress(Exception):
                        await starting
                    raise
                self.table.mark(worker, "unit_started")
                worker.unit_seen_active = True
                if worker.headless:
                    await self._await_group(worker)
                    return worker
                await self._await_healthy(worker)
                if part is not None:
                    await self.groups.ready(worker)
        except BaseException as exc:
            await self.abandon(worker, exc)
            raise
        self.tasks.spawn(self._measure(worker))
        return worker

    async def _await_group(self, worker: Worker) -> None:
        """A headless rank is up when its group's head answers (the head's loader says so in
        the group's record, and this loader's group keeper moves it to ready); it fails
        when its process ends or its group does."""
        deadline = time.monotonic() + self.cfg.health.start_timeout_s
        while time.monotonic() < deadline:
            if worker.done.done():
                raise LoadFailed(await self._failure_reason(worker, worker.done.result()))
            if worker.state is WorkerState.READY:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(worker.done), self.cfg.health.interval_s)
        raise LoadFailed(
            await self._failure_reason(
                worker, f"its group was not ready within {self.cfg.health.start_timeout_s:.0f} s"
            )
        )

    async def _reserve(
        self, spec: ModelSpec, replica: int, plan: StartPlan, requested: float, part: RankPart | None = None
    ) -> Worker:
        """Evict the plan's victims and enter the new worker in the table (under the place lock)."""
        await self.warm.evict(plan.evict, spec.name, plan.gpus[0])
        name = plan.unit
        worker = Worker(
            model=spec.name,
            replica=replica,
            unit=name,
            socket=socket_path(self.cfg.workers.socket_dir, name),
            gpus=plan.gpus,
            budget_bytes=plan.per_gpu_bytes,
            state=WorkerState.STARTING,
            state_reason=f"placed on GPU {','.join(map(str, plan.gpus))}",
            pinned=spec.pinned,
            part=part,
            # Not a model whose answer was wrong after a wake, until an operator clears it.
            sleep_mode=engine.sleep_enabled(spec, self.gpus.kind) and not self.store.sleep_blocked(spec.name),
            # A cold-start trial runs a changed copy of the model's spec.
            trial=spec != self.catalog.models.get(spec.name),
        )
        worker.marks["requested"] = requested
        self.table.mark(worker, "placed")
        self.table.add(worker, "placed")
        return worker

    async def _loaded_units(self, model: str) -> set[str]:
        """The model's units systemd still has loaded, in any state (a name is never reused
        while it does: StartTransientUnit would answer UnitExists)."""
        units = await self.systemd.list_units(UNIT_GLOB)
        return {u.name for u in units if (parsed := parse_unit_name(u.name)) and parsed[0] == model}

    async def abandon(self, worker: Worker, exc: BaseException) -> None:
        """A start that failed or was cancelled leaves nothing behind: no unit, no table
        entry, no socket directory."""
        reason = exc.message if isinstance(exc, SswError) else f"{type(exc).__name__}: {exc}".rstrip(": ")
        if isinstance(exc, asyncio.CancelledError):
            if self.tasks.closing:
                return  # the loader is stopping: the next one adopts this worker
            reason = "its load was cancelled"
        else:
            worker.failure = f"start failed: {reason}"
        if worker.state is WorkerState.STARTING:
            self.table.move(worker, WorkerState.STOPPING, worker.failure or reason)
        await self.retirer.stop_unit(worker)

    async def await_adopted(self, worker: Worker) -> Worker:
        try:
            await self._await_healthy(worker)
        except BaseException as exc:
            await self.abandon(worker, exc)
            raise
        return worker

    async def _await_healthy(self, worker: Worker) -> None:
        """Probe /health until the starting worker answers, fails, or runs out of time;
        meanwhile note when its process has bound its socket (the end of process_up)."""
        deadline = time.monotonic() + self.cfg.health.start_timeout_s
        while time.monotonic() < deadline:
            if worker.done.done():
                raise LoadFailed(await self._failure_reason(worker, worker.done.result()))
            if "bound" not in worker.marks and "requested" in worker.marks and worker.socket.exists():
                self.table.mark(worker, "bound")
            if await self.probes.healthy(worker.socket):
                # Not a phase: the known-answer check's start, for its span in a trace.
                worker.marks["answered"] = time.time()
                # A model's first start records its answer to the fixed prompt; a later one
                # must repeat it, or it is not routed to. (Before it is ready: nothing else
                # runs on it meanwhile.)
                wrong = await self._compare_known_answer(worker, "after a start", block_sleep=False, record=True)
                if wrong is not None:
                    raise LoadFailed(wrong)
                self.table.mark(worker, "healthy")
                took = worker.marks["healthy"] - worker.started_at
                phases = describe_phases(worker.marks)
                # What its ETA said (the median before this load): its error is measured.
                expected = self.store.load_seconds(worker.model)
                said = f" (expected {expected:.1f} s)" if expected is not None and not worker.trial else ""
                self.table.move(
                    worker, WorkerState.READY, f"healthy after {took:.1f} s{said}" + (f": {phases}" if phases else "")
                )
                if self.on_load_result is not None:
                    self.on_load_result(worker.model, "ready", took)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(worker.done), self.cfg.health.interval_s)
        raise LoadFailed(
            await self._failure_reason(
                worker, f"not healthy within {self.cfg.health.start_timeout_s:.0f} s (health.start_timeout_s)"
            )
        )

    async def _failure_reason(self, worker: Worker, error: str | None) -> str:
        if self.on_load_result is not None:
            self.on_load_result(worker.model, "failed", time.time() - worker.started_at)
        lines = await journal.tail(worker.unit, JOURNAL_LINES_ON_FAILURE, self.cfg.systemd.journal_directory)
        base = error or f"{worker.unit} stopped during start-up"
        return base + (JOURNAL_SEPARATOR + " | ".join(lines) if lines else "")

    async def _measure(self, worker: Worker) -> None:
        """Record what the healthy worker really holds and how long it took to load."""
        load_s = worker.state_since - worker.started_at
        held = None
        if self.gpus.kind == "nvml":
            held = self.inventory.held(worker, await self.inventory.gpu_snapshot()) or None
            worker.held_bytes = held
        spec = self.catalog.models.get(worker.model)
        if worker.trial:
            return  # started with other options than configured: its figures are the trial's
        # A tensor-parallel footprint is per GPU of a split model, a rank's per host: not comparable.
        await self.store.record(worker.model, held if len(worker.gpus) == 1 and worker.part is None else None, load_s)
        self.feed.changed()
        if spec is None or self.store.routes(spec.name, spec.fingerprint) is not None:
            return  # known for this model as configured
        # vLLM builds its OpenAPI document on first asking, holding its event loop
        # for most of a second: not while the requests that waited for it arrive.
        await asyncio.sleep(ROUTES_PROBE_DELAY_S)
        mounted = await self.probes.routes(worker.socket)
        if mounted is not None:
            await self.store.record_routes(spec.name, spec.fingerprint, inference_paths(mounted))
            self.feed.changed()

    async def _record_known_answer(self, worker: Worker, spec: ModelSpec) -> None:
        """On a model's first healthy start, its greedy answer to the fixed prompt."""
        result, answer, detail = await self.probes.known_answer(worker.socket, worker.model)
        if result is Canary.PASSED and answer is not None:
            await self.store.record_known_answer(spec.name, spec.fingerprint, answer)
            log.info("%s: known answer recorded: %r", worker.unit, answer.text)
        elif result is Canary.FAILED:
            log.warning("%s: no known answer recorded: %s", worker.unit, detail)

    async def _compare_known_answer(
        self, worker: Worker, when: str, block_sleep: bool, record: bool = False
    ) -> str | None:
        """Why the worker's answer to the fixed prompt is not the recorded one (None: it is,
        or none is recorded (with ``record``: this one is now), or the model does not
        complete text). A wrong answer is counted and, after a wake, the model sleeps no
        more until an operator clears it."""
        spec = self.catalog.models.get(worker.model)
        if spec is None or worker.trial or worker.adopted or not self.cfg.health.known_answer:
            return None
        recorded = self.store.known_answer(spec.name, spec.fingerprint)
        if recorded is None:
            if record:
                await self._record_known_answer(worker, spec)
            return None
        result, answer, detail = await self.probes.known_answer(worker.socket, worker.model)
        if result is Canary.NOT_APPLICABLE:
            return None
        if answer is None:
            return f"the known-answer check {when} failed: {detail}"
        differs = recorded.differs(answer, self.cfg.health.known_answer_logprob_tolerance)
        if differs is None:
            return None
        why = f"the known answer {when} differs: {differs}"
        log.error("%s: %s%s", worker.unit, why, "; the model sleeps no more until cleared" if block_sleep else "")
        await self.store.known_answer_failed(worker.model, why, block_sleep)
        if self.on_check_failed is not None:
            self.on_check_failed(worker.model, "wake" if block_sleep else "start")
        return why

    async def wake(self, spec: ModelSpec, worker: Worker, gpu: int | None) -> Worker:
        """Wake a sleeping replica where it sleeps (evicting there if need be) and route to
        it once a 1-token canary passed; when that cannot be done, stop it and load cold."""
        worker.marks = {"requested": self.loads.get(spec.name).since}
        why: str | None = None
        turn = Turn(self.parts, spec.name)
        while True:
            deferred: SwapDeferred | None = None
            drain: list[str] = []
            async with self.inventory.place_lock:
                # Stopped (unloaded, over the sleepers' budget) while this wake waited for the
                # lock: there is nothing to wake, and no failure of the model's either.
                stopped = (
                    self.table.get(worker.unit) is not worker or worker.state not in ASLEEP or bool(worker.retirement)
                )
                if stopped:
                    break
                gpus = await self.inventory.gpu_snapshot()
                need = max(worker.budget_bytes - self.inventory.held(worker, gpus), 0)
                rec = self.loads.get(spec.name)
                residents = [r for r in self.inventory.residents(gpus, rec.protect_since) if r.unit != worker.unit]
                try:
                    views = self.inventory.device_views(gpus)
                    plan = plan_wake(need, worker.gpus, views, residents, self.cfg.placement.policy, rec.rank)
                except SwapDeferred as exc:
                    deferred = exc
                except SswError as exc:
                    why = exc.message
                    break
                else:
                    drain = turn.to_drain(plan.drain)
                    if not drain:
                        await self.warm.evict(plan.evict, spec.name, worker.gpus[0])
                        self.table.mark(worker, "placed")
                        self.table.move(worker, WorkerState.WAKING, f"woken for {spec.name}'s requests")
                        break
            if deferred is not None:
                await turn.defer(deferred)  # past swap_wait_s the load fails; the sleeper sleeps on
            else:
                await turn.let_serve(drain)
        if stopped:
            log.info("%s: stopped while its wake waited; %s loads cold once it is gone", worker.unit, spec.name)
            await self.retirer.wait_gone([worker])
            return await self.start_replica(spec, worker.replica, gpu)
        if why is not None:
            log.warning("%s: cannot wake where it sleeps (%s): stopping it; %s loads cold", worker.unit, why, spec.name)
            await self.retirer.retire(worker, f"no room to wake on GPU {worker.gpus[0]}: {why}", cause="no_room")
            return await self.start_replica(spec, worker.replica, gpu)
        level = worker.sleep_level
        try:
            await self.inventory.wait_released(self.table.leaving_on(worker.gpus))
            async with contextlib.AsyncExitStack() as stack:
                for g in sorted(worker.gpus):
                    await stack.enter_async_context(self.inventory.device_locks.setdefault(g, asyncio.Lock()))
                self.table.mark(worker, "evicted")
                started = time.monotonic()
                failure = await self.probes.wake(worker.socket, self.cfg.workers.wake_timeout_s)
                if failure is None and worker.canary:
                    result, detail = await self.probes.canary(worker.socket, worker.model)
                    if result is Canary.FAILED:
                        failure = f"the 1-token canary after the wake failed: {detail}"
                    elif result is Canary.NOT_APPLICABLE:
                        worker.canary = False
                if failure is None:
                    failure = await self._compare_known_answer(worker, "after the wake", block_sleep=True)
                if failure is not None:
                    raise LoadFailed(failure)
                took = time.monotonic() - started
        except LoadFailed as exc:
            log.warning("%s: wake failed (%s): stopping it; %s loads cold", worker.unit, exc.message, spec.name)
            if worker.state is WorkerState.WAKING:
                self.table.move(worker, WorkerState.STOPPING, f"wake failed: {exc.message}; loading cold")
            await self.retirer.stop_unit(worker)
            return await self.start_replica(spec, worker.replica, gpu)
        except BaseException as exc:
            await self.abandon(worker, exc)
            raise
        self.table.mark(worker, "healthy")
        worker.check_failures.clear()
        self.table.move(
            worker,
            WorkerState.READY,
            f"awake after {took:.2f} s from sleep level {level or '?'}" + (", canary passed" if worker.canary else ""),
        )
        worker.sleep_level = 0  # after the move: the lifecycle's wake is counted by its level
        self.tasks.spawn(self.retirer.describe(worker, "awake"))
        worker.last_used = time.time()  # just asked for: not the next victim, not idle
        if level:
            await self.store.record_wake(spec.name, level, took)
        return worker
