"""The worker table: one place that starts, adopts, watches and stops vLLM
workers, and the only place that changes a worker's state.

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
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from . import engine, journal
from .config import Config
from .errors import LoadFailed, SswError, SystemdError, WorkerNotFound
from .gpus import GpuInfo, GpuSource
from .placement import DeviceView, choose_device
from .registry import ModelSpec, Registry
from .systemd import Systemd
from .units import UNIT_GLOB, parse_unit_name, unit_name
from .vram import estimate_bytes

log = logging.getLogger(__name__)


class WorkerState(enum.StrEnum):
    STARTING = "starting"  # unit started, vLLM not answering /health yet
    READY = "ready"  # /health answers 200; requests are routed here
    UNHEALTHY = "unhealthy"  # was ready, /health stopped answering; not routed
    STOPPING = "stopping"  # stop requested, unit not gone yet


@dataclass
class Worker:
    model: str
    replica: int
    unit: str
    port: int
    gpu: int
    budget_bytes: int
    state: WorkerState
    started_at: float = field(default_factory=time.time)
    state_since: float = field(default_factory=time.time)
    adopted: bool = False
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
            "gpu": self.gpu,
            "port": self.port,
            "url": self.url,
            "vram_budget_bytes": self.budget_bytes,
            "uptime_s": round(now - self.started_at, 1),
            "state_for_s": round(now - self.state_since, 1),
            "adopted": self.adopted,
        }


class WorkerManager:
    def __init__(self, cfg: Config, systemd: Systemd, gpus: GpuSource, registry: Registry) -> None:
        self.cfg = cfg
        self.systemd = systemd
        self.gpus = gpus
        self.registry = registry
        self.workers: dict[str, Worker] = {}
        self.last_errors: dict[str, str] = {}
        self._loads: dict[str, asyncio.Task[list[Worker]]] = {}
        self._place_lock = asyncio.Lock()
        self._device_locks: dict[int, asyncio.Lock] = {}
        self._subscribers: set[asyncio.Queue[None]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._http: aiohttp.ClientSession | None = None
        self.seq = 0
        systemd.on_state_change(self._on_unit_state)

    # --- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.cfg.health.probe_timeout_s))
        await self.adopt()
        self._spawn(self._health_loop())

    async def close(self) -> None:
        """Stop watching; workers keep running (a restarted loader adopts them)."""
        for task in list(self._tasks) + list(self._loads.values()):
            task.cancel()
        for task in list(self._tasks) + list(self._loads.values()):
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

    def reserved_by_device(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for w in self.workers.values():
            out[w.gpu] = out.get(w.gpu, 0) + w.budget_bytes
        return out

    async def gpu_snapshot(self) -> list[GpuInfo]:
        return await self.gpus.snapshot(self.reserved_by_device())

    def loading(self, model: str) -> bool:
        task = self._loads.get(model)
        return task is not None and not task.done()

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
                gpu = int(env[engine.ENV_GPU])
                budget = int(env.get(engine.ENV_BUDGET, "0"))
            except (KeyError, ValueError):
                log.warning("%s: not adopted: it lacks ssw's SSW_* environment", status.name)
                self.systemd.unwatch(status.name)
                continue
            model, replica = parsed
            started = details.active_enter_us / 1e6 if details.active_enter_us else time.time()
            worker = Worker(
                model=model,
                replica=replica,
                unit=status.name,
                port=port,
                gpu=gpu,
                budget_bytes=budget,
                state=WorkerState.STARTING,
                started_at=started,
                adopted=True,
                unit_seen_active=True,
            )
            self.workers[worker.unit] = worker
            log.info("%s: adopted (model %s, GPU %d, port %d)", worker.unit, model, gpu, port)
            if await self._probe(worker):
                self._set_state(worker, WorkerState.READY, "adopted")
            else:
                self._spawn(self._await_healthy(worker))
        self.changed()

    # --- loading ----------------------------------------------------------------------

    def load(self, spec: ModelSpec) -> asyncio.Task[list[Worker]]:
        """Bring the model's replicas up; one load per model however often it is asked (single flight)."""
        task = self._loads.get(spec.name)
        if task is None or task.done():
            task = asyncio.create_task(self._load(spec))
            self._loads[spec.name] = task
            task.add_done_callback(lambda t: self._load_done(spec.name, t))
            self.changed()
        return task

    def _load_done(self, model: str, task: asyncio.Task[list[Worker]]) -> None:
        if self._loads.get(model) is task:
            del self._loads[model]
        if not task.cancelled():
            task.exception()  # a background load may have no awaiter; this marks its error as seen
        self.changed()

    async def _load(self, spec: ModelSpec) -> list[Worker]:
        existing = {w.replica for w in self.workers_of(spec.name) if w.state is not WorkerState.STOPPING}
        starts = [self._start_replica(spec, r) for r in range(1, spec.replicas + 1) if r not in existing]
        results = await asyncio.gather(*starts, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        ready = [w for w in self.workers_of(spec.name) if w.state is WorkerState.READY]
        if errors and not ready:
            err = errors[0]
            message = err.message if isinstance(err, SswError) else f"{type(err).__name__}: {err}"
            self.last_errors[spec.name] = message
            raise LoadFailed(f"loading {spec.name} failed: {message}")
        self.last_errors.pop(spec.name, None)
        return ready

    def _free_port(self) -> int:
        taken = {w.port for w in self.workers.values()}
        for port in range(self.cfg.workers.port_min, self.cfg.workers.port_max + 1):
            if port in taken:
                continue
            # A port some other process holds would make vLLM fail after a long start.
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                # As servers bind: a port in TIME_WAIT from a stopped worker is free.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
        raise SswError(
            f"no free worker port in {self.cfg.workers.port_min}-{self.cfg.workers.port_max} (workers.port_min/max)"
        )

    async def _start_replica(self, spec: ModelSpec, replica: int) -> Worker:
        need = estimate_bytes(spec)
        async with self._place_lock:
            # Choice and reservation happen with no await in between: two loads
            # can never both count the same free memory.
            gpus = await self.gpu_snapshot()
            reserved = self.reserved_by_device()
            views = [
                DeviceView(
                    index=g.index,
                    total=g.memory_total,
                    reserved=reserved.get(g.index, 0),
                    used_by_others=0 if self.gpus.kind == "simulated" else self._foreign_use(g, reserved),
                )
                for g in gpus
            ]
            gpu = choose_device(need, views)
            total = next(g.memory_total for g in gpus if g.index == gpu)
            port = self._free_port()
            name = unit_name(spec.name, replica)
            worker = Worker(
                model=spec.name,
                replica=replica,
                unit=name,
                port=port,
                gpu=gpu,
                budget_bytes=need,
                state=WorkerState.STARTING,
            )
            self.workers[name] = worker
        unit = engine.worker_unit(self.cfg, spec, replica, port, gpu, need, total if self.gpus.kind == "nvml" else None)
        lock = self._device_locks.setdefault(gpu, asyncio.Lock())
        # vLLM checks free device memory at start and profiles it: two workers
        # starting on one GPU at once would each see the other's memory move.
        async with lock:
            log.info("%s: starting (GPU %d, port %d, budget %.1f GB)", name, gpu, port, need / 1e9)
            self.changed()
            try:
                await self.systemd.reset_failed(name)
                await self.systemd.start_transient(unit)
            except BaseException as exc:
                self._remove(worker, f"start failed: {exc}")
                raise
            worker.unit_seen_active = True
            await self._await_healthy(worker)
        return worker

    @staticmethod
    def _foreign_use(gpu: GpuInfo, reserved: dict[int, int]) -> int:
        # Memory in use beyond what ssw's workers are budgeted (other processes,
        # the driver). Never negative: a worker below its budget frees nothing.
        return max(gpu.memory_used - reserved.get(gpu.index, 0), 0)

    async def _probe(self, worker: Worker) -> bool:
        assert self._http is not None
        try:
            async with self._http.get(worker.url + "/health") as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def _await_healthy(self, worker: Worker) -> None:
        deadline = time.monotonic() + self.cfg.health.start_timeout_s
        while time.monotonic() < deadline:
            if worker.done.done():
                raise LoadFailed(worker.done.result() or f"{worker.unit} stopped during start-up")
            if await self._probe(worker):
                self._set_state(worker, WorkerState.READY, f"healthy after {time.time() - worker.started_at:.1f} s")
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(worker.done), self.cfg.health.interval_s)
        reason = f"not healthy within {self.cfg.health.start_timeout_s:.0f} s (health.start_timeout_s)"
        await self._stop_worker(worker, reason)
        raise LoadFailed(f"{worker.unit} {reason}")

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health.check_interval_s)
            watched = [w for w in self.workers.values() if w.state in (WorkerState.READY, WorkerState.UNHEALTHY)]
            results = await asyncio.gather(*(self._probe(w) for w in watched))
            for worker, ok in zip(watched, results, strict=True):
                if worker.state in (WorkerState.READY, WorkerState.UNHEALTHY):
                    self.mark(worker, ok)

    def mark(self, worker: Worker, healthy: bool) -> None:
        if healthy:
            self._set_state(worker, WorkerState.READY, "health check passed")
        else:
            self._set_state(worker, WorkerState.UNHEALTHY, "health check failed")

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
        error = f"the unit went {active}/{sub} unexpectedly; see 'journalctl -u {unit}'"
        self._remove(worker, error)
        self._spawn(self._record_exit(worker, error))

    async def _record_exit(self, worker: Worker, error: str) -> None:
        lines = await journal.tail(worker.unit, 5, self.cfg.systemd.journal_directory)
        if lines:
            self.last_errors[worker.model] = error + ": " + " | ".join(lines)
            self.changed()

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
        self._set_state(worker, WorkerState.STOPPING, reason)
        try:
            await self.systemd.stop(worker.unit, timeout=self.cfg.workers.stop_timeout_s + 15)
        except SystemdError as exc:
            log.error("%s: stop failed: %s", worker.unit, exc)
            raise
        self._remove(worker, None)
