"""The worker table: one place that places, starts, adopts, watches, evicts
and stops vLLM workers, and the only place that changes a worker's state.

Each state change is logged once with the unit name and published to
subscribers (the gateway's push channel) as a new snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from . import engine, journal
from .config import Config
from .errors import LoadFailed, NoCapacity, SswError, SystemdError, WorkerNotFound
from .gpus import GpuInfo, GpuSource
from .placement import DeviceView, Resident, place
from .registry import ModelSpec, Registry
from .store import FactStore
from .systemd import Systemd
from .units import UNIT_GLOB, parse_unit_name, unit_name
from .vram import GB, vram_need

log = logging.getLogger(__name__)
JOURNAL_LINES_ON_FAILURE = 8
CRASH_WINDOW_S = 600.0  # crashes further apart than this do not add up to a crash loop


class WorkerState(enum.StrEnum):
    STARTING = "starting"  # unit started, vLLM not answering /health yet
    READY = "ready"  # /health answers 200; requests are routed here
    UNHEALTHY = "unhealthy"  # was ready, /health stopped answering; not routed
    STOPPING = "stopping"  # unloaded or evicted: takes no new requests, in-flight ones drain


@dataclass
class Worker:
    model: str
    replica: int
    unit: str
    port: int
    gpus: tuple[int, ...]
    budget_bytes: int  # reserved on each of its GPUs
    state: WorkerState
    pinned: bool = False
    started_at: float = field(default_factory=time.time)
    state_since: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    adopted: bool = False
    held_bytes: int | None = None  # measured on its busiest GPU (NVML); None: unknown
    # When each step of its load happened (time.time()): requested, placed, evicted,
    # unit_started, bound (vLLM binds its port before it builds the engine), healthy.
    marks: dict[str, float] = field(default_factory=dict)
    # systemd reports a new transient unit as inactive before it activates; only
    # an inactive state after the unit was seen running means the worker ended.
    unit_seen_active: bool = False
    # Set once the worker leaves the table, so waiters learn why.
    done: asyncio.Future[str | None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def public(self) -> dict[str, Any]:
        now = time.time()
        return {
            "unit": self.unit,
            "model": self.model,
            "replica": self.replica,
            "state": self.state.value,
            "gpus": list(self.gpus),
            "port": self.port,
            "url": self.url,
            "pinned": self.pinned,
            "vram_budget_bytes": self.budget_bytes,
            "vram_measured_bytes": self.held_bytes,
            "uptime_s": round(now - self.started_at, 1),
            "state_for_s": round(now - self.state_since, 1),
            "idle_s": round(now - self.last_used, 1),
            "adopted": self.adopted,
            "unit_active": self.unit_seen_active,
            "load_phases_s": load_phases(self.marks),
            "load_marks": {k: round(v, 4) for k, v in self.marks.items()},
        }


# A load, step by step: each phase ends at its mark and starts at the one before.
PHASES = (
    ("placement", "placed"),  # deciding where (and whom to evict)
    ("eviction", "evicted"),  # the victims' vLLM shutting down; waiting for the GPU's start lock
    ("unit_start", "unit_started"),  # StartTransientUnit until systemd's job is done
    ("process_up", "bound"),  # Python and vLLM's imports until it binds its port
    ("engine_ready", "healthy"),  # weights, KV cache, warm-up until /health answers 200
)


def load_phases(marks: dict[str, float]) -> dict[str, float] | None:
    """Seconds spent in each phase of a load, up to the last one reached ("total" once
    healthy); None for an adopted worker, whose load this loader did not see."""
    start = marks.get("requested")
    if start is None:
        return None
    phases: dict[str, float] = {}
    previous = start
    for phase, mark in PHASES:
        at = marks.get(mark)
        if at is None:
            break
        phases[phase] = round(at - previous, 3)
        previous = at
    if "healthy" in marks:
        phases["total"] = round(marks["healthy"] - start, 3)
    return phases


def describe_phases(marks: dict[str, float]) -> str:
    phases = load_phases(marks) or {}
    return ", ".join(f"{phase.replace('_', ' ')} {phases[phase]:.2f} s" for phase, _ in PHASES if phase in phases)


class WorkerManager:
    def __init__(self, cfg: Config, systemd: Systemd, gpus: GpuSource, registry: Registry, store: FactStore) -> None:
        self.cfg = cfg
        self.systemd = systemd
        self.gpus = gpus
        self.registry = registry
        self.store = store
        self.workers: dict[str, Worker] = {}
        self.last_errors: dict[str, str] = {}
        self.cooldowns: dict[str, tuple[float, str]] = {}  # model -> (monotonic deadline, reason)
        self.evictions = 0
        self.seq = 0
        self._loads: dict[str, asyncio.Task[list[Worker]]] = {}
        self._load_started: dict[str, float] = {}
        self._place_lock = asyncio.Lock()
        self._device_locks: dict[int, asyncio.Lock] = {}
        self._crashes: dict[str, list[float]] = {}  # model -> monotonic times its workers died
        self._subscribers: set[asyncio.Queue[None]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._http: aiohttp.ClientSession | None = None
        # (model, "ready" or "failed", seconds from unit start to healthy or failure)
        self.on_load_result: Callable[[str, str, float], None] | None = None
        systemd.on_state_change(self._on_unit_state)

    # --- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.cfg.health.probe_timeout_s))
        await self.adopt()
        self._spawn(self._health_loop())

    async def close(self) -> None:
        """Stop watching; workers keep running (a restarted loader adopts them)."""
        pending = list(self._tasks) + list(self._loads.values())
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(BaseException):
                await task
        if self._http:
            await self._http.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
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

    def _set_state(self, worker: Worker, state: WorkerState, reason: str = "") -> None:
        if worker.state is state:
            return
        log.info("%s: %s -> %s%s", worker.unit, worker.state.value, state.value, f" ({reason})" if reason else "")
        worker.state = state
        worker.state_since = time.time()
        self.changed()

    def _remove(self, worker: Worker, error: str | None) -> None:
        if self.workers.get(worker.unit) is not worker:
            return
        del self.workers[worker.unit]
        self.systemd.unwatch(worker.unit)
        if error:
            log.warning("%s: %s -> gone (%s)", worker.unit, worker.state.value, error)
            self.last_errors[worker.model] = error
        else:
            log.info("%s: %s -> gone", worker.unit, worker.state.value)
        if not worker.done.done():
            worker.done.set_result(error)
        self.changed()

    # --- queries ----------------------------------------------------------------------

    def workers_of(self, model: str) -> list[Worker]:
        return sorted((w for w in self.workers.values() if w.model == model), key=lambda w: w.replica)

    def loading(self, model: str) -> bool:
        task = self._loads.get(model)
        return task is not None and not task.done()

    def loading_since(self, model: str) -> float | None:
        """Wall time the model's current load started; None when it is not loading."""
        return self._load_started.get(model) if self.loading(model) else None

    def cooldown(self, model: str) -> tuple[float, str] | None:
        """(seconds left, reason) while a failed model is refused."""
        entry = self.cooldowns.get(model)
        if entry is None:
            return None
        left = entry[0] - time.monotonic()
        if left <= 0:
            del self.cooldowns[model]
            return None
        return left, entry[1]

    def touch(self, unit: str, when: float) -> None:
        worker = self.workers.get(unit)
        if worker is not None and when > worker.last_used:
            worker.last_used = min(when, time.time())

    def _held(self, worker: Worker, gpus: list[GpuInfo]) -> int:
        """What a worker holds on one of its GPUs now."""
        if self.gpus.kind == "simulated":
            # Simulated memory is taken when the worker is up and given back when it is gone.
            return worker.budget_bytes if worker.state is not WorkerState.STARTING else 0
        per_gpu = [
            sum(p.used_bytes or 0 for p in g.processes if p.unit == worker.unit) for g in gpus if g.index in worker.gpus
        ]
        return max(per_gpu, default=0)

    def _simulated_use(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for w in self.workers.values():
            if w.state is not WorkerState.STARTING:
                for g in w.gpus:
                    out[g] = out.get(g, 0) + w.budget_bytes
        return out

    async def gpu_snapshot(self) -> list[GpuInfo]:
        return await self.gpus.snapshot(self._simulated_use())

    def device_views(self, gpus: list[GpuInfo]) -> list[DeviceView]:
        pending: dict[int, int] = {}
        for w in self.workers.values():
            if w.state is WorkerState.STARTING:
                # Reserved but not yet (fully) allocated: what NVML does not show yet.
                missing = max(w.budget_bytes - self._held(w, gpus), 0)
                for g in w.gpus:
                    pending[g] = pending.get(g, 0) + missing
        return [DeviceView(g.index, g.memory_total, g.memory_used, pending.get(g.index, 0)) for g in gpus]

    def _residents(self, gpus: list[GpuInfo]) -> list[Resident]:
        out = []
        for w in self.workers.values():
            held = self._held(w, gpus) or w.budget_bytes
            evictable = w.state in (WorkerState.READY, WorkerState.UNHEALTHY) and not w.pinned
            # Until a load was measured, size stands in: about 1 s per GB from local disk.
            cost = self.store.load_seconds(w.model) or w.budget_bytes / GB
            out.append(Resident(w.unit, w.gpus, held, w.last_used, evictable, cost))
        return out

    # --- adoption ---------------------------------------------------------------------

    async def adopt(self) -> None:
        """Take over the worker units already running, so a restart never restarts a model."""
        for status in await self.systemd.list_units(UNIT_GLOB):
            parsed = parse_unit_name(status.name)
            if parsed is None or status.active_state not in ("active", "activating", "reloading"):
                continue
            self.systemd.watch(status.name)
            details = await self.systemd.details(status.name)
            if details is None:
                continue
            env = details.environment
            try:
                port = int(env[engine.ENV_PORT])
                gpus = tuple(int(g) for g in env[engine.ENV_GPU].split(","))
                budget = int(env.get(engine.ENV_BUDGET, "0"))
            except (KeyError, ValueError):
                log.warning("%s: not adopted: it lacks ssw's SSW_* environment", status.name)
                self.systemd.unwatch(status.name)
                continue
            model, replica = parsed
            spec = self.registry.models.get(model)
            started = details.active_enter_us / 1e6 if details.active_enter_us else time.time()
            worker = Worker(
                model=model,
                replica=replica,
                unit=status.name,
                port=port,
                gpus=gpus,
                budget_bytes=budget,
                state=WorkerState.STARTING,
                pinned=spec.pinned if spec else False,
                started_at=started,
                adopted=True,
                unit_seen_active=True,
            )
            self.workers[worker.unit] = worker
            log.info("%s: adopted (model %s, GPU %s, port %d)", worker.unit, model, env[engine.ENV_GPU], port)
            if await self._probe(worker):
                self._set_state(worker, WorkerState.READY, "adopted")
            else:
                self._spawn(self._await_healthy(worker))
        self.changed()

    # --- loading ----------------------------------------------------------------------

    def load(self, spec: ModelSpec, gpu: int | None = None) -> asyncio.Task[list[Worker]]:
        """Bring the model's replicas up; one load per model however often it is asked (single flight)."""
        task = self._loads.get(spec.name)
        if task is not None and not task.done():
            return task
        cooling = self.cooldown(spec.name)
        if cooling is not None and not self.workers_of(spec.name):
            left, reason = cooling
            raise LoadFailed(
                f"'{spec.name}' failed to load and is refused for {left:.0f} s more: {reason}",
                retry_after_s=max(int(left + 0.999), 1),
            )
        task = asyncio.create_task(self._load(spec, gpu))
        self._loads[spec.name] = task
        self._load_started[spec.name] = time.time()
        task.add_done_callback(lambda t: self._load_done(spec.name, t))
        self.changed()
        return task

    def _load_done(self, model: str, task: asyncio.Task[list[Worker]]) -> None:
        if self._loads.get(model) is task:
            del self._loads[model]
        if not task.cancelled():
            task.exception()  # a background load may have no awaiter; this marks its error as seen
        self.changed()

    async def _load(self, spec: ModelSpec, gpu: int | None = None) -> list[Worker]:
        existing = {w.replica for w in self.workers_of(spec.name) if w.state is not WorkerState.STOPPING}
        starts = [self._start_replica(spec, r, gpu) for r in range(1, spec.replicas + 1) if r not in existing]
        results = await asyncio.gather(*starts, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        ready = [w for w in self.workers_of(spec.name) if w.state is WorkerState.READY]
        if errors and not ready:
            err = errors[0]
            message = err.message if isinstance(err, SswError) else f"{type(err).__name__}: {err}"
            self.last_errors[spec.name] = message
            cooldown = self.cfg.placement.failed_load_cooldown_s
            # Lack of room is not the model's fault; anything else is, and a
            # cooldown keeps a bad model from causing a storm of retries.
            if cooldown > 0 and not isinstance(err, NoCapacity | asyncio.CancelledError):
                self.cooldowns[spec.name] = (time.monotonic() + cooldown, message)
            if isinstance(err, NoCapacity):
                raise NoCapacity(message)
            raise LoadFailed(f"loading {spec.name} failed: {message}")
        self.last_errors.pop(spec.name, None)
        return ready

    def _free_port(self) -> int:
        taken = {w.port for w in self.workers.values()}
        reusable: int | None = None
        for port in range(self.cfg.workers.port_min, self.cfg.workers.port_max + 1):
            if port in taken:
                continue
            if not self._port_bound(port):
                return port
            # As servers bind (SO_REUSEADDR), a port a stopped worker left in TIME_WAIT
            # is free too; a clean one is preferred, since it shows when vLLM binds it.
            # A port some other process holds would make vLLM fail after a long start.
            if reusable is None and not self._port_bound(port, as_server=True):
                reusable = port
        if reusable is not None:
            return reusable
        raise SswError(
            f"no free worker port in {self.cfg.workers.port_min}-{self.cfg.workers.port_max} (workers.port_min/max)"
        )

    async def _start_replica(self, spec: ModelSpec, replica: int, gpu: int | None = None) -> Worker:
        need = vram_need(spec, self.cfg.placement, self.store.vram_bytes(spec.name))
        allowed = (gpu,) if gpu is not None else (spec.gpus[(replica - 1) % len(spec.gpus)],) if spec.gpus else None
        async with self._place_lock:
            # Everything from the snapshot to the reservation happens under one
            # lock: two loads can never both count the same free memory.
            gpus = await self.gpu_snapshot()
            try:
                plan = place(
                    need,
                    self.device_views(gpus),
                    self._residents(gpus),
                    self.cfg.placement.policy,
                    allowed,
                    self.cfg.placement.tensor_parallel,
                )
            except SswError as exc:
                exc.message = f"{spec.name}: {exc.message}"
                raise
            victims = [self.workers[u] for u in plan.evict]
            for victim in victims:
                self.evictions += 1
                idle = time.time() - victim.last_used
                self._set_state(
                    victim,
                    WorkerState.STOPPING,
                    f"evicted to make room for {spec.name} on GPU {plan.gpus[0]}: least recently used, "
                    f"idle {idle:.0f} s",
                )
            totals = {g.index: g.memory_total for g in gpus}
            port = self._free_port()
            name = unit_name(spec.name, replica)
            worker = Worker(
                model=spec.name,
                replica=replica,
                unit=name,
                port=port,
                gpus=plan.gpus,
                budget_bytes=plan.per_gpu_bytes,
                state=WorkerState.STARTING,
                pinned=spec.pinned,
            )
            worker.marks["requested"] = self._load_started.get(spec.name, worker.started_at)
            worker.marks["placed"] = time.time()
            self.workers[name] = worker
            self.changed()
        if victims:
            await asyncio.gather(*(self._stop_worker(v, "evicted") for v in victims), return_exceptions=True)
        unit = engine.worker_unit(
            self.cfg,
            spec,
            replica,
            port,
            plan.gpus,
            plan.per_gpu_bytes,
            totals[plan.gpus[0]],
            # vLLM on the CPU (simulated GPUs) sizes its KV cache from VLLM_CPU_KVCACHE_SPACE.
            need.kv_bytes if self.gpus.kind == "nvml" else None,
        )
        # vLLM checks free device memory at start and profiles it: two workers
        # starting on one GPU at once would each see the other's memory move.
        async with contextlib.AsyncExitStack() as stack:
            for g in sorted(plan.gpus):
                await stack.enter_async_context(self._device_locks.setdefault(g, asyncio.Lock()))
            log.info(
                "%s: starting (GPU %s, port %d, %.1f GB per GPU from %s)",
                name,
                ",".join(map(str, plan.gpus)),
                port,
                plan.per_gpu_bytes / GB,
                need.source,
            )
            worker.marks["evicted"] = time.time()
            try:
                self._check_room(worker, totals)
                await self.systemd.reset_failed(name)
                await self.systemd.start_transient(unit)
            except BaseException as exc:
                self._remove(worker, f"start failed: {exc}")
                raise
            worker.marks["unit_started"] = time.time()
            worker.unit_seen_active = True
            await self._await_healthy(worker)
        self._spawn(self._measure(worker))
        return worker

    def _check_room(self, new: Worker, totals: dict[int, int]) -> None:
        """The invariant placement guarantees, checked where it matters: the budgets of
        the workers whose processes run on a GPU never add up to more than it has."""
        for g in new.gpus:
            running = sum(
                w.budget_bytes for w in self.workers.values() if g in w.gpus and (w.unit_seen_active or w is new)
            )
            if running > totals[g]:
                raise SswError(
                    f"refusing to start {new.unit}: GPU {g} would hold {running / GB:.1f} GB of "
                    f"{totals[g] / GB:.1f} GB (a placement bug; please report it)"
                )

    def update_held(self, gpus: list[GpuInfo]) -> None:
        """What each worker holds now (NVML attribution); unknown stays None."""
        if self.gpus.kind != "nvml":
            return
        for w in self.workers.values():
            if w.state is not WorkerState.STARTING:
                w.held_bytes = self._held(w, gpus) or None

    async def _measure(self, worker: Worker) -> None:
        """Record what the healthy worker really holds and how long it took to load."""
        load_s = worker.state_since - worker.started_at
        held = None
        if self.gpus.kind == "nvml":
            held = self._held(worker, await self.gpu_snapshot()) or None
            worker.held_bytes = held
        # A tensor-parallel footprint is per GPU of a split model: not comparable.
        await self.store.record(worker.model, held if len(worker.gpus) == 1 else None, load_s)
        self.changed()

    async def _probe(self, worker: Worker) -> bool:
        assert self._http is not None
        try:
            async with self._http.get(worker.url + "/health") as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    @staticmethod
    def _port_bound(port: int, as_server: bool = False) -> bool:
        """Whether some socket holds the port: any socket at all, even a connection in
        TIME_WAIT; or, as_server, one that would keep a server (SO_REUSEADDR) from
        binding it. vLLM binds its port once its imports are done but listens only
        when the engine is up, so a connection attempt cannot tell."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if as_server:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return True
        return False

    async def _await_healthy(self, worker: Worker) -> None:
        """Probe /health until the starting worker answers, fails, or runs out of time;
        meanwhile note when its process has bound the port (the end of process_up)."""
        deadline = time.monotonic() + self.cfg.health.start_timeout_s
        # Connections a previous worker left in TIME_WAIT on this port also block a
        # bind: if the port is held before vLLM could have started, the mark is skipped.
        watch_bind = "requested" in worker.marks and not self._port_bound(worker.port)
        while time.monotonic() < deadline:
            if worker.done.done():
                raise LoadFailed(await self._failure_reason(worker, worker.done.result()))
            if watch_bind and "bound" not in worker.marks and self._port_bound(worker.port):
                worker.marks["bound"] = time.time()
            if await self._probe(worker):
                worker.marks["healthy"] = time.time()
                took = worker.marks["healthy"] - worker.started_at
                phases = describe_phases(worker.marks)
                self._set_state(
                    worker, WorkerState.READY, f"healthy after {took:.1f} s" + (f": {phases}" if phases else "")
                )
                if self.on_load_result is not None:
                    self.on_load_result(worker.model, "ready", took)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(worker.done), self.cfg.health.interval_s)
        reason = f"not healthy within {self.cfg.health.start_timeout_s:.0f} s (health.start_timeout_s)"
        await self._stop_worker(worker, reason)
        raise LoadFailed(await self._failure_reason(worker, reason))

    async def _failure_reason(self, worker: Worker, error: str | None) -> str:
        if self.on_load_result is not None:
            self.on_load_result(worker.model, "failed", time.time() - worker.started_at)
        lines = await journal.tail(worker.unit, JOURNAL_LINES_ON_FAILURE, self.cfg.systemd.journal_directory)
        base = error or f"{worker.unit} stopped during start-up"
        return base + (" | last log lines: " + " | ".join(lines) if lines else "")

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health.check_interval_s)
            watched = [w for w in self.workers.values() if w.state in (WorkerState.READY, WorkerState.UNHEALTHY)]
            results = await asyncio.gather(*(self._probe(w) for w in watched))
            for worker, ok in zip(watched, results, strict=True):
                if worker.state in (WorkerState.READY, WorkerState.UNHEALTHY):
                    self._set_state(
                        worker,
                        WorkerState.READY if ok else WorkerState.UNHEALTHY,
                        "health check passed" if ok else "health check failed",
                    )

    # --- unit events ---------------------------------------------------------------

    def _on_unit_state(self, unit: str, active: str, sub: str) -> None:
        worker = self.workers.get(unit)
        if worker is None:
            return
        if active in ("activating", "active", "reloading"):
            worker.unit_seen_active = True
            return
        if active not in ("inactive", "failed") or not worker.unit_seen_active:
            return
        if worker.state is WorkerState.STOPPING:
            self._remove(worker, None)
            return
        was_ready = worker.state is not WorkerState.STARTING
        self._remove(worker, f"the unit went {active}/{sub} unexpectedly; see 'journalctl -u {unit}'")
        spec = self.registry.models.get(worker.model)
        # A start-up failure belongs to its load (and its cooldown); a worker
        # that died after being ready is brought back.
        if was_ready and spec is not None:
            self._spawn(self._restore(spec))

    async def _restore(self, spec: ModelSpec) -> None:
        now = time.monotonic()
        crashes = [t for t in self._crashes.get(spec.name, []) if now - t < CRASH_WINDOW_S] + [now]
        self._crashes[spec.name] = crashes
        failures = len(crashes) - 1  # earlier crashes in the window
        if not spec.pinned and failures >= self.cfg.placement.max_restarts:
            reason = f"its worker died {failures + 1} times in a row; see 'journalctl -u {unit_name(spec.name)}'"
            log.error("model %s: %s; not restarting it", spec.name, reason)
            self.cooldowns[spec.name] = (time.monotonic() + self.cfg.placement.failed_load_cooldown_s, reason)
            self._crashes.pop(spec.name, None)
            self.changed()
            return
        delay = min(self.cfg.placement.restart_backoff_s * 2**failures, self.cfg.placement.restart_backoff_max_s)
        kind = "pinned model" if spec.pinned else "model"
        log.warning("%s %s: worker died; restarting in %.1f s (attempt %d)", kind, spec.name, delay, failures + 1)
        await asyncio.sleep(delay)
        with contextlib.suppress(SswError):
            await self.load(spec)

    # --- unloading -----------------------------------------------------------------

    async def unload(self, model: str) -> list[str]:
        workers = self.workers_of(model)
        task = self._loads.get(model)
        if task is not None:
            task.cancel()
        if not workers:
            raise WorkerNotFound(f"model '{model}' is not loaded")
        await asyncio.gather(*(self._stop_worker(w, "unload requested") for w in workers))
        return [w.unit for w in workers]

    async def _stop_worker(self, worker: Worker, reason: str) -> None:
        """Stop taking requests (the gateway routes only ready workers), then stop the
        unit: SIGTERM lets vLLM finish in-flight requests for vllm.shutdown_timeout_s."""
        self._set_state(worker, WorkerState.STOPPING, reason)
        try:
            await self.systemd.stop(worker.unit, timeout=self.cfg.workers.stop_timeout_s + 15)
        except SystemdError as exc:
            log.error("%s: stop failed: %s", worker.unit, exc)
            raise
        self._remove(worker, None)
