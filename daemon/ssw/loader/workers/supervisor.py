"""The loader's machinery: places, starts, adopts, watches, drains and stops
worker units, and carries out the decisions of :mod:`ssw.loader.decide.placement` and
:mod:`ssw.common.states`. States change only through the worker table and the
load book; this module does the I/O (D-Bus, the workers' sockets, GPUs).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import grp
import logging
import os
import pwd
import shutil
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from ssw.common.probes import Canary, Probes
from ssw.common.routes import inference_paths
from ssw.common.states import ASLEEP, LEAVING, LIVE, Failure, IllegalTransition, LoadState, WorkerState, recent, recover
from ssw.config import Config
from ssw.errors import ConfigError, LoadFailed, ModelBusy, NoCapacity, SswError, SystemdError, WorkerNotFound
from ssw.loader.decide import tiers
from ssw.loader.decide.placement import DeviceView, Resident, place
from ssw.loader.decide.vram import GB, VramNeed, vram_need
from ssw.loader.gpus import GpuInfo, GpuSource
from ssw.loader.models.registry import ModelSpec, Registry
from ssw.loader.store import FactStore, Retiring
from ssw.loader.systemd import engine, journal
from ssw.loader.systemd.bus import Systemd
from ssw.loader.systemd.units import (
    UNIT_GLOB,
    instance_for,
    parse_unit_name,
    socket_dir_name,
    socket_path,
    unit_name,
)
from ssw.loader.workers.loads import LoadBook, LoadRecord
from ssw.loader.workers.table import Worker, WorkerTable, describe_phases, load_phases

log = logging.getLogger(__name__)
T = TypeVar("T")

JOURNAL_LINES_ON_FAILURE = 8
JOURNAL_SEPARATOR = " | last log lines: "
# A drained worker shows no request in flight for this long before it is stopped:
# a request routed just before the gateway heard of the drain arrives meanwhile.
DRAIN_SETTLE_S = 0.5
DRAIN_POLL_S = 0.2
DRAINED = "drained"
FREED_POLL_S = 0.25
ROUTES_PROBE_DELAY_S = 5.0
IDLE_CHECK_S = 1.0
# On simulated GPUs a worker may say how much device memory it holds in this file
# next to its socket (the fake engine does; NVML measures real GPUs for itself).
SIMULATED_MEMORY_FILE = "device-memory"


def _accounts(cfg: Config) -> tuple[int, int]:
    """(uid of the workers' account, gid of the gateway's group): the owners of socket directories."""
    try:
        user = pwd.getpwnam(cfg.workers.user)
    except KeyError:
        raise ConfigError(f"workers.user: no account named {cfg.workers.user!r} on this host") from None
    if user.pw_uid == 0:
        raise ConfigError(f"workers.user: {cfg.workers.user!r} is root; workers never run as root")
    try:
        group = grp.getgrnam(cfg.auth.gateway_group)
    except KeyError:
        raise ConfigError(
            f"auth.gateway_group: no group named {cfg.auth.gateway_group!r} on this host "
            "(the gateway reaches the workers' sockets through it)"
        ) from None
    return user.pw_uid, group.gr_gid


class Supervisor:
    def __init__(
        self,
        cfg: Config,
        systemd: Systemd,
        gpus: GpuSource,
        registry: Registry,
        store: FactStore,
        retiring: Retiring,
    ) -> None:
        self.cfg = cfg
        self.systemd = systemd
        self.gpus = gpus
        self.registry = registry
        self.store = store
        self.retiring = retiring
        self.epoch = uuid.uuid4().hex
        self.seq = 0
        self.table = WorkerTable(self.changed)
        self.table.on_leave = self._left
        self.loads = LoadBook(self.changed)
        self.probes = Probes(
            cfg.health.probe_timeout_s,
            cfg.health.canary_timeout_s,
            max(cfg.workers.sleep_timeout_s, cfg.workers.wake_timeout_s),
            cfg.health.probe_max_bytes,
        )
        # Device memory the workers report on simulated GPUs (unit -> bytes), read with each snapshot.
        self._reported: dict[str, int] = {}
        self.host_memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        self.evictions = 0
        self._place_lock = asyncio.Lock()
        self._device_locks: dict[int, asyncio.Lock] = {}
        self._subscribers: set[asyncio.Queue[None]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._uid, self._gid = -1, -1
        self._closing = False  # shutting down: cancelled starts are adopted later, not stopped
        # (model, "ready" or "failed", seconds from unit start to healthy or failure)
        self.on_load_result: Callable[[str, str, float], None] | None = None
        systemd.on_state_change(self._on_unit_state)

    # --- running ------------------------------------------------------------------

    async def start(self) -> None:
        self._uid, self._gid = await asyncio.to_thread(_accounts, self.cfg)
        await asyncio.to_thread(self._prepare_socket_root)
        await self.adopt()
        self._spawn(self._health_loop())
        self._spawn(self._idle_loop())
        if self.cfg.health.canary_interval_s > 0:
            self._spawn(self._canary_loop())

    async def close(self) -> None:
        """Stop watching; workers keep running (a restarted loader adopts them)."""
        self._closing = True
        pending = list(self._tasks)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(BaseException):
                await task
        await self.probes.close()

    def _spawn(self, coro: Awaitable[T]) -> asyncio.Task[T]:
        task: asyncio.Task[T] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_crash)
        return task

    # --- publishing -----------------------------------------------------------------

    def subscribe(self) -> asyncio.Queue[None]:
        queue: asyncio.Queue[None] = asyncio.Queue(maxsize=1)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[None]) -> None:
        self._subscribers.discard(queue)

    def changed(self) -> None:
        self.seq += 1
        for queue in self._subscribers:
            # One pending token is enough: a subscriber always sends the latest snapshot.
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)

    # --- sockets ----------------------------------------------------------------------

    def _prepare_socket_root(self) -> None:
        root = self.cfg.workers.socket_dir
        root.mkdir(parents=True, exist_ok=True)
        # Workers may pass through (to their own directory); nobody may list it.
        os.chmod(root, 0o711)

    def _make_socket_dir(self, unit: str) -> Path:
        """A fresh directory for the worker's socket: its account may create the socket,
        the gateway's group may connect (setgid: the socket gets that group), nobody else
        may even look."""
        path = socket_path(self.cfg.workers.socket_dir, unit)
        _remove_dir(path.parent)  # a stale one from a dead worker
        path.parent.mkdir(mode=0o700)
        os.chmod(path.parent, 0o2750)  # before chown: chmod needs ownership
        os.chown(path.parent, self._uid, self._gid)
        return path

    def _remove_socket_dir(self, socket: Path) -> None:
        if socket.parent.parent == self.cfg.workers.socket_dir:
            _remove_dir(socket.parent)

    def _remove_stale_socket_dirs(self) -> None:
        keep = {socket_dir_name(w.unit) for w in self.table}
        with contextlib.suppress(OSError):
            for entry in self.cfg.workers.socket_dir.iterdir():
                if entry.is_dir() and entry.name not in keep:
                    _remove_dir(entry)

    # --- GPUs and placement inputs -------------------------------------------------------

    def _held(self, worker: Worker, gpus: list[GpuInfo]) -> int:
        """What a worker holds on one of its GPUs now."""
        if self.gpus.kind == "simulated":
            reported = self._reported.get(worker.unit)
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
            held = self._held(w, [])
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
            self._reported = await asyncio.to_thread(self._read_reported)
        return await self.gpus.snapshot(self._simulated_use())

    def device_views(self, gpus: list[GpuInfo]) -> list[DeviceView]:
        pending: dict[int, int] = {}
        releasing: dict[int, int] = {}
        for w in self.table:
            if w.state in (WorkerState.STARTING, WorkerState.WAKING):
                # Reserved but not yet (fully) allocated: what NVML does not show yet.
                missing = max(w.budget_bytes - self._held(w, gpus), 0)
                for g in w.gpus:
                    pending[g] = pending.get(g, 0) + missing
            elif w.state in LEAVING:
                held = self._held(w, gpus) or w.budget_bytes
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

    def _residents(self, gpus: list[GpuInfo], protect_since: float | None = None) -> list[Resident]:
        """The workers holding GPU memory; with ``protect_since``, those used interactively
        since then are not evictable (a load for batch work)."""
        out = []
        residual = int(self.cfg.workers.sleep_residual_gb * GB)
        for w in self.table:
            asleep = w.state in ASLEEP
            held = self._held(w, gpus) if asleep else self._held(w, gpus) or w.budget_bytes
            evictable = w.state in (WorkerState.READY, WorkerState.UNHEALTHY, *ASLEEP) and not w.pinned
            if protect_since is not None and w.interactive_used >= protect_since:
                evictable = False
            # Until a load was measured, size stands in: about 1 s per GB from local disk.
            cost = self.store.load_seconds(w.model) or w.budget_bytes / GB
            # An awake worker with sleep mode may be put to sleep rather than stopped: it
            # then keeps its CUDA context on the GPU.
            keeps = residual if w.sleep_mode and not asleep else 0
            out.append(Resident(w.unit, w.gpus, held, w.last_used, evictable, cost, asleep, keeps))
        return out

    def update_held(self, gpus: list[GpuInfo]) -> None:
        """What each worker holds now (NVML attribution); unknown stays None."""
        if self.gpus.kind != "nvml":
            return
        for w in self.table:
            if w.state not in (WorkerState.STARTING, WorkerState.WAKING):
                w.held_bytes = self._held(w, gpus) or None

    def touch_adapters(self, unit: str, used: dict[str, float]) -> None:
        worker = self.table.get(unit)
        if worker is None:
            return
        for name, when in used.items():
            if name in worker.adapters and when > worker.adapters[name]:
                worker.adapters[name] = min(when, time.time())

    def touch(self, unit: str, when: float, interactive: float | None = None) -> None:
        worker = self.table.get(unit)
        if worker is None:
            return
        if when > worker.last_used:
            worker.last_used = min(when, time.time())
        if interactive is not None and interactive > worker.interactive_used:
            worker.interactive_used = min(interactive, time.time())

    def preview(self, spec: ModelSpec, gpus: list[GpuInfo]) -> tuple[int, int] | None:
        """(bytes free after, workers evicted) if the model were loaded now; None when it
        could not be (the fleet compares hosts with it)."""
        need = vram_need(spec, self.cfg.placement, self.store.vram_bytes(spec.name))
        devices = self.device_views(gpus)
        residents = self._residents(gpus)
        try:
            plan = place(
                need,
                devices,
                residents,
                self.cfg.placement.policy,
                spec.gpus or None,
                self.cfg.placement.tensor_parallel,
            )
        except NoCapacity:
            return None
        device = next(d for d in devices if d.index == plan.gpus[0])
        freed = sum(r.held for r in residents if r.unit in plan.evict and device.index in r.gpus)
        return device.free_after_release + freed - plan.per_gpu_bytes, len(plan.evict)

    async def evicts_protected(self, spec: ModelSpec, protect_since: float) -> str | None:
        """Which workers used interactively since ``protect_since`` loading this model
        now would evict (None: none, or it needs no load, or it cannot be placed at all,
        which the load itself then reports)."""
        if self.table.live(spec.name):
            return None
        need = vram_need(spec, self.cfg.placement, self.store.vram_bytes(spec.name))
        policy, allowed, tp = self.cfg.placement.policy, spec.gpus or None, self.cfg.placement.tensor_parallel
        async with self._place_lock:
            gpus = await self.gpu_snapshot()
            devices = self.device_views(gpus)
            try:
                place(need, devices, self._residents(gpus, protect_since), policy, allowed, tp)
                return None
            except NoCapacity:
                pass
            try:
                plan = place(need, devices, self._residents(gpus), policy, allowed, tp)
            except NoCapacity:
                return None
        now = time.time()
        used = [
            f"{w.model} (used {now - w.interactive_used:.0f} s ago)"
            for unit in plan.evict
            if (w := self.table.get(unit)) is not None and w.interactive_used >= protect_since
        ]
        return ", ".join(used) or None

    # --- adoption -------------------------------------------------------------------------

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
            spec = self.registry.models.get(model)
            leaving = status.active_state == "deactivating"
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
                state_reason="its unit was stopping when the loader started"
                if leaving
                else "adopted asleep"
                if asleep
                else "adopted",
                pinned=spec.pinned if spec else False,
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
                self._spawn(self._stop_unit(worker))
            elif asleep:
                if self.retiring.reason(worker.unit) is not None:
                    self.retire(worker, (self.retiring.reason(worker.unit) or "") + " (resumed after a loader restart)")
            elif await self.probes.healthy(socket):
                self.table.move(worker, WorkerState.READY, "adopted, healthy")
                if spec is not None and spec.lora is not None:
                    # The adapters it had loaded are still loaded: take them over.
                    now = time.time()
                    worker.adapters = {a: now for a in await self.probes.adapters(socket) or set()}
                if (reason := self.retiring.reason(worker.unit)) is not None:
                    self.retire(worker, reason + " (resumed after a loader restart)")
            elif self.retiring.reason(worker.unit) is not None:
                self.retire(worker, self.retiring.reason(worker.unit) or "")
            else:
                starting.add(model)
        await self.retiring.keep_only(self.table.units())
        await asyncio.to_thread(self._remove_stale_socket_dirs)
        for model in sorted(starting):
            spec = self.registry.models.get(model)
            if spec is not None:
                # Its load continues here: wait for the adopted worker, start missing replicas.
                self.load(spec, reason="adopted while starting")
                continue
            # No load can finish it, and nothing else would: it would hold its GPU budget,
            # unevictable, for ever.
            for worker in self.table.of_model(model):
                if worker.state is WorkerState.STARTING:
                    self.retire(worker, f"adopted while starting, but model '{model}' is no longer in the registry")
        self.changed()

    # --- loading ----------------------------------------------------------------------

    def load(
        self,
        spec: ModelSpec,
        gpu: int | None = None,
        reason: str = "requested",
        evict: bool = True,
        protect_since: float | None = None,
    ) -> asyncio.Future[list[Worker]]:
        """Bring the model's replicas up: one load per model however often it is asked
        (single flight), never before a backoff ends, never during a cooldown; with
        ``evict`` off, only where free memory holds it; with ``protect_since``, never
        evicting a worker used interactively since then."""
        rec = self.loads.get(spec.name)
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
        rec.protect_since = protect_since
        rec.task = self._spawn(self._load(spec, gpu, evict))
        return rec.task

    async def _load(self, spec: ModelSpec, gpu: int | None = None, evict: bool = True) -> list[Worker]:
        rec = self.loads.get(spec.name)
        if spec.is_adapter:
            try:
                attached = await self._load_adapter(spec)
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
            self._wake(spec, asleep[r], gpu) if r in asleep else self._start_replica(spec, r, gpu, evict)
            for r in range(1, spec.replicas + 1)
            if r not in have
        ]
        jobs += [self._await_adopted(w) for w in live if w.state is WorkerState.STARTING]
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
            rec.task = self._spawn(self._retry(spec, deadline))
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
        return await self._load(self.registry.models.get(spec.name, spec))

    # --- LoRA adapters -------------------------------------------------------------------

    async def _load_adapter(self, spec: ModelSpec) -> list[Worker]:
        """An adapter is served by its base's workers: the base loaded (one load however
        many ask), then the adapter loaded into each of its ready workers."""
        base = self.registry.models.get(spec.base or "")
        if base is None:
            raise LoadFailed(f"{spec.name}: its base model '{spec.base}' is not on this host")
        workers = await asyncio.shield(self.load(base, reason=f"for its adapter {spec.name}"))
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
            self.changed()

    async def _unload_adapter(self, spec: ModelSpec) -> list[str]:
        holders = [w for w in self.table if spec.name in w.adapters]
        for worker in holders:
            async with worker.adapter_lock:
                await self.probes.unload_adapter(worker.socket, spec.name, self.cfg.workers.wake_timeout_s)
                worker.adapters.pop(spec.name, None)
        self.changed()
        return [w.unit for w in holders]

    async def _loaded_units(self, model: str) -> set[str]:
        """The model's units systemd still has loaded, in any state (a name is never reused
        while it does: StartTransientUnit would answer UnitExists)."""
        units = await self.systemd.list_units(UNIT_GLOB)
        return {u.name for u in units if (parsed := parse_unit_name(u.name)) and parsed[0] == model}

    async def _start_replica(self, spec: ModelSpec, replica: int, gpu: int | None = None, evict: bool = True) -> Worker:
        need = vram_need(spec, self.cfg.placement, self.store.vram_bytes(spec.name))
        allowed = (gpu,) if gpu is not None else (spec.gpus[(replica - 1) % len(spec.gpus)],) if spec.gpus else None
        requested = self.loads.get(spec.name).since
        async with self._place_lock:
            # Everything from the snapshot to the reservation happens under one
            # lock: two loads can never both count the same free memory.
            gpus = await self.gpu_snapshot()
            try:
                plan = place(
                    need,
                    self.device_views(gpus),
                    self._residents(gpus, self.loads.get(spec.name).protect_since) if evict else [],
                    self.cfg.placement.policy,
                    allowed,
                    self.cfg.placement.tensor_parallel,
                )
            except SswError as exc:
                exc.message = f"{spec.name}: {exc.message}"
                raise
            await self._evict(plan.evict, spec.name, plan.gpus[0])
            taken = self.table.units() | await self._loaded_units(spec.name)
            name = unit_name(spec.name, instance_for(spec.name, replica, spec.replicas, taken))
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
                sleep_mode=engine.sleep_enabled(spec, self.gpus.kind),
                # A cold-start trial runs a changed copy of the model's spec.
                trial=spec != self.registry.models.get(spec.name),
            )
            worker.marks["requested"] = requested
            worker.marks["placed"] = time.time()
            self.table.add(worker, "placed")
        try:
            totals = {g.index: g.memory_total for g in gpus}
            nodes = tuple(g.device_node for g in gpus if g.index in plan.gpus and g.device_node)
            # vLLM checks free device memory at start and profiles it: never start
            # while a worker on these GPUs is still shutting down.
            await self._wait_released(self.table.leaving_on(plan.gpus))
            async with contextlib.AsyncExitStack() as stack:
                # ...nor while another one starts there.
                for g in sorted(plan.gpus):
                    await stack.enter_async_context(self._device_locks.setdefault(g, asyncio.Lock()))
                log.info(
                    "%s: starting (GPU %s, %.1f GB per GPU from %s)",
                    name,
                    ",".join(map(str, plan.gpus)),
                    plan.per_gpu_bytes / GB,
                    need.source,
                )
                worker.marks["evicted"] = time.time()
                self._check_room(worker, totals)
                # A few metadata calls on /run, done inline: in a thread, a cancelled
                # start would leave them running behind the next worker's back.
                socket = self._make_socket_dir(name)
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
                worker.marks["unit_started"] = time.time()
                worker.unit_seen_active = True
                await self._await_healthy(worker)
        except BaseException as exc:
            await self._abandon(worker, exc)
            raise
        self._spawn(self._measure(worker))
        return worker

    def _check_room(self, new: Worker, totals: dict[int, int]) -> None:
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

    async def _abandon(self, worker: Worker, exc: BaseException) -> None:
        """A start that failed or was cancelled leaves nothing behind: no unit, no table
        entry, no socket directory."""
        reason = exc.message if isinstance(exc, SswError) else f"{type(exc).__name__}: {exc}".rstrip(": ")
        if isinstance(exc, asyncio.CancelledError):
            if self._closing:
                return  # the loader is stopping: the next one adopts this worker
            reason = "its load was cancelled"
        else:
            worker.failure = f"start failed: {reason}"
        if worker.state is WorkerState.STARTING:
            self.table.move(worker, WorkerState.STOPPING, worker.failure or reason)
        await self._stop_unit(worker)

    async def _await_adopted(self, worker: Worker) -> Worker:
        try:
            await self._await_healthy(worker)
        except BaseException as exc:
            await self._abandon(worker, exc)
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
                worker.marks["bound"] = time.time()
            if await self.probes.healthy(worker.socket):
                worker.marks["healthy"] = time.time()
                took = worker.marks["healthy"] - worker.started_at
                phases = describe_phases(worker.marks)
                self.table.move(
                    worker, WorkerState.READY, f"healthy after {took:.1f} s" + (f": {phases}" if phases else "")
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
            held = self._held(worker, await self.gpu_snapshot()) or None
            worker.held_bytes = held
        spec = self.registry.models.get(worker.model)
        if worker.trial:
            return  # started with other options than configured: its figures are the trial's
        # A tensor-parallel footprint is per GPU of a split model: not comparable.
        await self.store.record(worker.model, held if len(worker.gpus) == 1 else None, load_s)
        self.changed()
        if spec is None or self.store.routes(spec.name, spec.fingerprint) is not None:
            return  # known for this model as configured
        # vLLM builds its OpenAPI document on first asking, holding its event loop
        # for most of a second: not while the requests that waited for it arrive.
        await asyncio.sleep(ROUTES_PROBE_DELAY_S)
        mounted = await self.probes.routes(worker.socket)
        if mounted is not None:
            await self.store.record_routes(spec.name, spec.fingerprint, inference_paths(mounted))
            self.changed()

    # --- health ---------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health.check_interval_s)
            watched = [w for w in self.table if w.state in (WorkerState.READY, WorkerState.UNHEALTHY)]
            results = await asyncio.gather(*(self.probes.healthy(w.socket) for w in watched))
            for worker, ok in zip(watched, results, strict=True):
                self._checked(worker, "health", ok, "/health did not answer 200")

    async def _canary_loop(self) -> None:
        interval = self.cfg.health.canary_interval_s
        while True:
            await asyncio.sleep(interval)
            now = time.time()
            for worker in self.table:
                if worker.state not in (WorkerState.READY, WorkerState.UNHEALTHY) or not worker.canary:
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
        count = worker.check_failures[kind] = worker.check_failures.get(kind, 0) + 1
        limit = self.cfg.health.failures_to_replace
        self.table.move(worker, WorkerState.UNHEALTHY, f"{failure} ({count} of {limit})")
        if count >= limit:
            self._spawn(self._replace(worker, f"{failure} in {limit} checks in a row"))

    async def _replace(self, worker: Worker, why: str) -> None:
        """Kill a worker that hung (a frozen process answers no SIGTERM) and bring its model back."""
        worker.failure = f"hung: {why}"
        self.table.move(worker, WorkerState.STOPPING, f"replacing it: {why}")
        with contextlib.suppress(SystemdError):
            await self.systemd.kill(worker.unit, signal.SIGKILL)
        await self._stop_unit(worker)
        spec = self.registry.models.get(worker.model)
        if spec is not None:
            self._worker_lost(spec, Failure.HUNG, f"{worker.unit} was replaced: {why}")

    def _worker_lost(self, spec: ModelSpec, failure: Failure, message: str) -> None:
        rec = self.loads.get(spec.name)
        if rec.state is LoadState.LOADING:
            rec.died_during_load += 1  # its load decides when it ends
        elif rec.state is LoadState.IDLE:
            self._recover(spec, failure, message)
        # Backing off or cooling down already: that decision stands.

    # --- unit events ---------------------------------------------------------------------

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
        self._remove_socket_dir(worker.socket)  # inline, for the reason in _start_replica
        self._spawn(self.retiring.discard(worker.unit))
        if state is WorkerState.FAILED and previous in (WorkerState.READY, WorkerState.UNHEALTHY):
            spec = self.registry.models.get(worker.model)
            if spec is not None:
                kind = "pinned model" if spec.pinned else "model"
                log.warning("%s %s: worker died; restarting it (%s)", kind, spec.name, worker.unit)
                self._worker_lost(spec, Failure.DIED, f"{worker.unit} died: {worker.state_reason}")

    # --- retiring: unload, eviction ---------------------------------------------------------

    def retire(self, worker: Worker, reason: str, sleep_level: int = 0) -> asyncio.Task[None]:
        """Stop routing to the worker at once, let its in-flight requests finish (up to
        workers.drain_timeout_s), then put it to sleep at ``sleep_level`` (1 or 2) or
        stop its unit (0). Returns the task that does it."""
        if worker.retirement is not None:
            return worker.retirement
        if worker.state in (WorkerState.READY, WorkerState.UNHEALTHY):
            worker.sleep_level = sleep_level if worker.sleep_mode else 0
            self.table.move(worker, WorkerState.DRAINING, reason)
        elif worker.state in (WorkerState.STARTING, WorkerState.WAKING, *ASLEEP):
            self.table.move(worker, WorkerState.STOPPING, reason)
        worker.retirement = self._spawn(self._finish_retiring(worker, reason))
        return worker.retirement

    async def _finish_retiring(self, worker: Worker, reason: str) -> None:
        try:
            if worker.state is WorkerState.DRAINING:
                if not worker.sleep_level:
                    # Kept on disk: a loader restarted meanwhile finishes the drain.
                    await self.retiring.add(worker.unit, reason)
                outcome = await self._drain(worker)
                if worker.sleep_level and outcome == DRAINED and await self._put_to_sleep(worker):
                    return
                if worker.sleep_level and outcome != DRAINED:
                    outcome += "; not put to sleep with requests in flight"
                worker.sleep_level = 0
                self.table.move(worker, WorkerState.STOPPING, outcome)
            await self._stop_unit(worker)
        finally:
            worker.retirement = None

    # --- the warm tier: sleep, wake ------------------------------------------------------------

    async def _evict(self, units: tuple[str, ...], for_model: str, gpu: int) -> None:
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
                self.retire(victim, reason)
                continue
            choice = await self._tier_for(victim)
            self.retire(victim, f"{reason}; {_tier_text(choice)}", choice.level)

    async def _tier_for(self, worker: Worker) -> tiers.Choice:
        if not worker.sleep_mode:
            return tiers.Choice("stop", "sleep mode is off for this model")
        spec = self.registry.models.get(worker.model)
        details = await _quiet(self.systemd.details(worker.unit))
        wakes = {level: t for level in (1, 2) if (t := self.store.wake_seconds(worker.model, level)) is not None}
        victim = tiers.Victim(
            sleep_enabled=True,
            weights_bytes=spec.facts.weight_bytes if spec is not None else 0,
            ram_bytes=(details.memory_current or 0) if details is not None else 0,
            cold_start_s=self.store.load_seconds(worker.model),
            wake_s=wakes,
        )
        return tiers.choose(victim, self._ram_budget())

    def _ram_budget(self) -> int:
        p = self.cfg.placement
        return tiers.ram_budget(p.sleep_ram_gb, p.sleep_ram_fraction, self.host_memory)

    def _sleep_state(self, worker: Worker, reason: str) -> None:
        self.table.move(worker, WorkerState.SLEEPING, reason)
        self._spawn(self._describe(worker, f"asleep (level {worker.sleep_level or '?'})"))

    async def _describe(self, worker: Worker, state: str) -> None:
        """Show the warm tier in `systemctl status` (the unit's description)."""
        spec = self.registry.models.get(worker.model)
        text = f"ssw vLLM worker for {worker.model} (replica {worker.replica}, GPU {','.join(map(str, worker.gpus))})"
        if spec is not None:
            with contextlib.suppress(SystemdError):
                await self.systemd.set_description(worker.unit, f"{text}: {state}")

    async def _put_to_sleep(self, worker: Worker) -> bool:
        """Sleep a drained worker and see its GPU memory come free; False (with the
        reason logged) when either fails, and the caller stops the unit instead."""
        level = worker.sleep_level
        before = self._held(worker, await self.gpu_snapshot()) or worker.budget_bytes
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
        held = self._held(worker, await self.gpu_snapshot())
        self._sleep_state(
            worker,
            f"asleep at level {level} after {took:.2f} s; {(before - held) / GB:.1f} GB of GPU memory freed "
            f"({held / GB:.2f} GB kept)",
        )
        self._spawn(self._keep_sleepers_in_budget())
        return True

    async def _confirm_freed(self, worker: Worker, before: int) -> str | None:
        """Wait until the GPU memory the sleeping worker gave back shows as free (NVML, or
        what a simulated worker reports); None once it does, else why not."""
        residual = int(self.cfg.workers.sleep_residual_gb * GB)
        limit = self.cfg.workers.freed_timeout_s
        deadline = time.monotonic() + limit
        held = before
        while True:
            gpus = await self.gpu_snapshot()
            if self.gpus.kind == "simulated" and worker.unit not in self._reported:
                # Nothing to measure: the engine's word is all there is.
                return None if await self.probes.is_sleeping(worker.socket) else "it does not say it sleeps"
            held = self._held(worker, gpus)
            if tiers.freed(before, held, residual):
                return None
            if time.monotonic() >= deadline:
                return (
                    f"its GPU memory did not come free within {limit:.0f} s (workers.freed_timeout_s): "
                    f"{held / GB:.2f} GB still held of {before / GB:.2f} GB"
                )
            await asyncio.sleep(FREED_POLL_S)

    async def _keep_sleepers_in_budget(self) -> None:
        """Stop the least recently used sleepers while sleepers hold more host memory
        than the budget (placement.sleep_ram_gb or sleep_ram_fraction)."""
        asleep = self.table.asleep()
        for w in asleep:
            details = await _quiet(self.systemd.details(w.unit))
            if details is not None and details.memory_current is not None:
                w.ram_bytes = details.memory_current
        budget = self._ram_budget()
        sleepers = [tiers.Sleeper(w.unit, w.ram_bytes or 0, max(w.slept_at, w.last_used), w.pinned) for w in asleep]
        total = sum(x.ram_bytes for x in sleepers)
        for unit in tiers.over_budget(sleepers, budget):
            worker = self.table.get(unit)
            if worker is not None and worker.state in ASLEEP:
                self.retire(
                    worker,
                    f"stopped: sleepers hold {total / GB:.2f} GB of host memory, over the budget of "
                    f"{budget / GB:.2f} GB (placement.sleep_ram_gb); least recently used",
                )
        self.changed()

    async def _wake(self, spec: ModelSpec, worker: Worker, gpu: int | None) -> Worker:
        """Wake a sleeping replica where it sleeps (evicting there if need be) and route to
        it once a 1-token canary passed; when that cannot be done, stop it and load cold."""
        worker.marks = {"requested": self.loads.get(spec.name).since}
        why: str | None = None
        async with self._place_lock:
            # Stopped (unloaded, over the sleepers' budget) while this wake waited for the
            # lock: there is nothing to wake, and no failure of the model's either.
            stopped = self.table.get(worker.unit) is not worker or worker.state not in ASLEEP or bool(worker.retirement)
            if not stopped:
                gpus = await self.gpu_snapshot()
                need = max(worker.budget_bytes - self._held(worker, gpus), 0)
                protect = self.loads.get(spec.name).protect_since
                residents = [r for r in self._residents(gpus, protect) if r.unit != worker.unit]
                try:
                    for g in worker.gpus[1:]:
                        # A tensor-parallel sleeper wakes only where every GPU has room already.
                        view = next(d for d in self.device_views(gpus) if d.index == g)
                        if view.free_after_release < need:
                            raise NoCapacity(f"GPU {g} has {view.free_after_release / GB:.1f} GB free")
                    plan = place(
                        VramNeed(need, 0, None, "its size before it slept"),
                        self.device_views(gpus),
                        residents,
                        self.cfg.placement.policy,
                        worker.gpus[:1],
                    )
                except SswError as exc:
                    why = exc.message
                if why is None:
                    await self._evict(plan.evict, spec.name, worker.gpus[0])
                    worker.marks["placed"] = time.time()
                    self.table.move(worker, WorkerState.WAKING, f"woken for {spec.name}'s requests")
        if stopped:
            log.info("%s: stopped while its wake waited; %s loads cold once it is gone", worker.unit, spec.name)
            await self._wait_gone([worker])
            return await self._start_replica(spec, worker.replica, gpu)
        if why is not None:
            log.warning("%s: cannot wake where it sleeps (%s): stopping it; %s loads cold", worker.unit, why, spec.name)
            await self.retire(worker, f"no room to wake on GPU {worker.gpus[0]}: {why}")
            return await self._start_replica(spec, worker.replica, gpu)
        level = worker.sleep_level
        try:
            await self._wait_released(self.table.leaving_on(worker.gpus))
            async with contextlib.AsyncExitStack() as stack:
                for g in sorted(worker.gpus):
                    await stack.enter_async_context(self._device_locks.setdefault(g, asyncio.Lock()))
                worker.marks["evicted"] = time.time()
                started = time.monotonic()
                failure = await self.probes.wake(worker.socket, self.cfg.workers.wake_timeout_s)
                if failure is None and worker.canary:
                    result, detail = await self.probes.canary(worker.socket, worker.model)
                    if result is Canary.FAILED:
                        failure = f"the 1-token canary after the wake failed: {detail}"
                    elif result is Canary.NOT_APPLICABLE:
                        worker.canary = False
                if failure is not None:
                    raise LoadFailed(failure)
                took = time.monotonic() - started
        except LoadFailed as exc:
            log.warning("%s: wake failed (%s): stopping it; %s loads cold", worker.unit, exc.message, spec.name)
            if worker.state is WorkerState.WAKING:
                self.table.move(worker, WorkerState.STOPPING, f"wake failed: {exc.message}; loading cold")
            await self._stop_unit(worker)
            return await self._start_replica(spec, worker.replica, gpu)
        except BaseException as exc:
            await self._abandon(worker, exc)
            raise
        worker.marks["healthy"] = time.time()
        worker.sleep_level = 0
        worker.check_failures.clear()
        self.table.move(
            worker,
            WorkerState.READY,
            f"awake after {took:.2f} s from sleep level {level or '?'}" + (", canary passed" if worker.canary else ""),
        )
        self._spawn(self._describe(worker, "awake"))
        worker.last_used = time.time()  # just asked for: not the next victim, not idle
        if level:
            await self.store.record_wake(spec.name, level, took)
        return worker

    async def _idle_loop(self) -> None:
        """Workers of models with idle_ttl_s sleep (or stop) once idle that long."""
        while True:
            await asyncio.sleep(IDLE_CHECK_S)
            now = time.time()
            for worker in self.table:
                spec = self.registry.models.get(worker.model)
                if spec is None or spec.idle_ttl_s is None or worker.state is not WorkerState.READY:
                    continue
                idle_since = max(worker.last_used, worker.state_since)
                if worker.retirement is not None or now - idle_since < spec.idle_ttl_s:
                    continue
                if spec.pinned and not worker.sleep_mode:
                    continue  # pinned models stay up; they may only sleep when models.yaml says so
                choice = await self._tier_for(worker)
                idle = f"idle {now - idle_since:.0f} s (idle_ttl_s {spec.idle_ttl_s:g})"
                self.retire(worker, f"{idle}; {_tier_text(choice)}", choice.level)

    async def _drain(self, worker: Worker) -> str:
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

    async def _stop_unit(self, worker: Worker) -> None:
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

    async def _wait_gone(self, workers: list[Worker]) -> None:
        if workers:
            await asyncio.gather(*(asyncio.shield(w.done) for w in workers))

    async def _wait_released(self, workers: list[Worker]) -> None:
        """Until each worker gave its GPU memory back: asleep (seen freed) or gone."""
        if workers:
            await asyncio.gather(*(w.released.wait() for w in workers))

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
            self.retire(worker, "unload requested")
        await self._wait_gone([worker])
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
        spec = self.registry.models.get(model)
        if spec is not None and spec.is_adapter:
            units = await self._unload_adapter(spec)
            if not units and not pending:
                raise WorkerNotFound(f"adapter '{model}' is not loaded")
            return units
        workers = self.table.of_model(model)
        if not workers and not pending:
            raise WorkerNotFound(f"model '{model}' is not loaded")
        for worker in workers:
            if worker.state in LIVE or worker.state in ASLEEP:
                self.retire(worker, "unload requested")
            elif worker.state is WorkerState.DRAINING and worker.sleep_level:
                worker.sleep_level = 0  # unloaded while draining to sleep: stopped instead
        await self._wait_gone(workers)
        return [w.unit for w in workers]


def _remove_dir(path: Path) -> None:
    """Remove a worker's socket directory. The loader has no CAP_DAC_OVERRIDE, so it
    takes the directory back (CAP_CHOWN) to be allowed to empty it."""
    with contextlib.suppress(FileNotFoundError):
        os.chown(path, 0, 0)
    shutil.rmtree(path, ignore_errors=True)


def _tier_text(choice: tiers.Choice) -> str:
    how = {"sleep1": "to sleep at level 1", "sleep2": "to sleep at level 2", "stop": "to stop"}[choice.tier]
    return f"{how}: {choice.reason}"


async def _quiet(call: Awaitable[T]) -> T | None:
    """A D-Bus read whose failure only costs a figure."""
    try:
        return await call
    except SswError:
        return None


def _log_crash(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not isinstance(exc, SswError):
        log.error("background task failed", exc_info=exc)
