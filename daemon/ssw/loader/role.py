"""The loader role: registry, GPUs and workers, behind the admin API on loopback.

It is the only part of ssw that talks to systemd. The gateway learns the
workers from its ``GET /events`` stream and asks it for loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from redis.exceptions import RedisError

from ssw import __version__
from ssw.common import auth, http_errors, redis_sink
from ssw.common.contract import (
    GpuView,
    HostRecord,
    LoadAccepted,
    ModelStatus,
    ModelView,
    Preview,
    Snapshot,
    Status,
    valid_name,
)
from ssw.common.prom import CONTENT_TYPE
from ssw.common.routes import families_of_paths
from ssw.common.states import WorkerState
from ssw.config import Config
from ssw.errors import JobNotFound, MetricsUnavailable, ModelNotFound, SswError, WouldEvict, clip
from ssw.loader.decide import tiers
from ssw.loader.decide.vram import vram_need
from ssw.loader.gpus import GpuInfo, GpuSource
from ssw.loader.metrics import LoaderMetrics
from ssw.loader.models import pulls
from ssw.loader.models.capabilities import predict
from ssw.loader.models.registry import ModelSpec, Registry, scan
from ssw.loader.publish import Publisher
from ssw.loader.store import FactStore, Retiring
from ssw.loader.systemd import journal
from ssw.loader.systemd.bus import Systemd
from ssw.loader.systemd.units import parse_unit_name, unit_name
from ssw.loader.workers.supervisor import Supervisor

log = logging.getLogger(__name__)
RESCAN_MIN_INTERVAL_S = 2.0
EVENTS_KEEPALIVE_S = 15.0


class Loader:
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
        self.manager = Supervisor(cfg, systemd, gpus, registry, store, retiring)
        self.started_at = time.time()
        self.redis = redis_sink.client(cfg.redis_url)
        self.latest_gpus: list[GpuInfo] = []
        self.metrics = LoaderMetrics(
            worker_counts=self.manager.table.counts,
            evictions=lambda: self.manager.evictions,
            gpus=lambda: self.latest_gpus,
            reserved=lambda: {v.index: v.pending for v in self.manager.device_views(self.latest_gpus)},
        )
        self.manager.on_load_result = self._load_result
        if cfg.fleet.enabled:
            self.metrics.host = cfg.fleet.host_name()
        self._sampler: asyncio.Task[None] | None = None
        self._prewarm_task: asyncio.Task[None] | None = None
        self.puller = pulls.Puller(
            pulls.Settings(
                models_dir=cfg.models_dir,
                endpoint=cfg.pulls.endpoint,
                token_file=cfg.pulls.token_file,
                min_free_bytes=int(cfg.pulls.min_free_gb * 1e9),
                allow_http=cfg.pulls.allow_http,
            ),
            self.redis,
            self._pulled,
            lambda name: self.registry.name_taken(name),
        )
        self._redis_warned = 0.0
        # In a fleet, this host's state goes to the fleet's Redis every heartbeat.
        self.fleet = Publisher(cfg.fleet, self.host_record) if cfg.fleet.enabled else None
        self._last_scan = time.monotonic()
        # Set on shutdown so the open event streams end and the server can stop.
        self.closing = asyncio.Event()

    @classmethod
    async def create(cls, cfg: Config, systemd: Systemd, gpus: GpuSource) -> Loader:
        registry = await asyncio.to_thread(scan, cfg.models_dir, cfg.models_file)
        log.info(
            "registry: %d models, %d aliases, %d configured but missing, from %s",
            len(registry.models),
            len(registry.aliases),
            len(registry.missing),
            cfg.models_dir,
        )
        store = FactStore(cfg.state_dir / "models.json")
        await asyncio.to_thread(store.load)
        retiring = Retiring(cfg.state_dir / "retiring.json")
        await asyncio.to_thread(retiring.load)
        return cls(cfg, systemd, gpus, registry, store, retiring)

    async def start(self) -> None:
        await self.manager.start()
        self.latest_gpus = await self.manager.gpu_snapshot()
        self._sampler = asyncio.create_task(self._sample_gpus())
        started: list[asyncio.Future[Any]] = []
        for spec in self.registry.models.values():
            if spec.pinned or spec.preload:
                why = "pinned" if spec.pinned else "preload"
                try:
                    started.append(self.manager.load(spec, reason=f"{why}: loaded at start"))
                except SswError as exc:
                    log.error("%s model %s: %s", why, spec.name, exc.message)
        if self.cfg.placement.prewarm_hours > 0:
            self._prewarm_task = asyncio.create_task(self._prewarm(started))
        await self.puller.resume()
        if self.fleet is not None:
            self.fleet.start()

    async def _pulled(self, name: str) -> None:
        """A pull finished: its models are servable at once, and loaded if models.yaml pins
        or preloads one (models.yaml names a directory by its path)."""
        directory = self.cfg.models_dir / name
        for spec in (await self.rescan()).models.values():
            if spec.path == directory and (spec.pinned or spec.preload):
                with contextlib.suppress(SswError):
                    self.manager.load(spec, reason="pulled; pinned or preloaded")

    async def _prewarm(self, first: list[asyncio.Future[Any]]) -> None:
        """After the pinned and preloaded models, the ones most requested lately, one at a
        time, each only where free VRAM holds it (nothing is evicted for a guess)."""
        await asyncio.gather(*first, return_exceptions=True)
        hours = self.cfg.placement.prewarm_hours
        try:
            served = await redis_sink.served_counts(self.redis, "ssw:", hours * 3600)
        except (RedisError, OSError) as exc:
            log.warning("prewarm skipped: the request records in Redis cannot be read: %s", exc)
            return
        up = {w.model for w in self.manager.table if w.state is not WorkerState.FAILED}
        for name in tiers.prewarm_order(served, set(self.registry.models) - up):
            spec = self.registry.models[name]
            reason = f"prewarm: {served[name]} requests served in the last {hours:g} h"
            try:
                await self.manager.load(spec, reason=reason, evict=False)
            except SswError as exc:
                log.info("prewarm: %s not loaded: %s", name, exc.message)

    async def close(self) -> None:
        if self.fleet is not None:
            await self.fleet.close()
        await self.puller.close()
        if self._prewarm_task is not None:
            self._prewarm_task.cancel()
        if self._sampler is not None:
            self._sampler.cancel()
        await self.manager.close()
        await self.redis.aclose()

    def _load_result(self, model: str, result: str, seconds: float) -> None:
        self.metrics.loads.labels(model, result).inc()
        if result == "ready":
            self.metrics.load_duration.labels(model).observe(seconds)

    async def _sample_gpus(self) -> None:
        """Every few seconds: GPU memory, utilization, temperature, power, and what
        each worker holds; the latest in /status and /metrics, a history in Redis."""
        while True:
            await asyncio.sleep(self.cfg.gpus.sample_interval_s)
            try:
                gpus = await self.manager.gpu_snapshot()
            except Exception:  # a driver hiccup must not end sampling
                log.exception("GPU sampling failed")
                continue
            self.latest_gpus = gpus
            self.manager.update_held(gpus)
            samples = [
                {
                    "index": g.index,
                    "ts": round(time.time(), 3),
                    "memory_used_bytes": g.memory_used,
                    "memory_total_bytes": g.memory_total,
                    "utilization_pct": g.utilization_pct,
                    "temperature_c": g.temperature_c,
                    "power_w": g.power_w,
                }
                for g in gpus
            ]
            try:
                await redis_sink.add_gpu_samples(self.redis, "ssw:", samples)
            except (RedisError, OSError, TimeoutError) as exc:
                if time.monotonic() - self._redis_warned > redis_sink.LOG_EVERY_S:
                    self._redis_warned = time.monotonic()
                    log.warning("GPU history not written to Redis: %s", exc)

    async def rescan(self) -> Registry:
        self.registry = await asyncio.to_thread(scan, self.cfg.models_dir, self.cfg.models_file)
        self.manager.registry = self.registry
        self._last_scan = time.monotonic()
        self.manager.changed()
        return self.registry

    async def resolve(self, name: str) -> ModelSpec:
        """A model by name or alias; a miss rescans the models dir (at most every 2 s),
        so a model copied onto the host is servable without a restart."""
        if not valid_name(name):
            raise ModelNotFound(name, self.registry.known_names())
        try:
            return self.registry.resolve(name)
        except ModelNotFound:
            if time.monotonic() - self._last_scan < RESCAN_MIN_INTERVAL_S:
                raise
        return (await self.rescan()).resolve(name)

    # --- views ----------------------------------------------------------------------

    def _fallback_name(self, name: str) -> str | None:
        try:
            return self.registry.resolve(name).name
        except ModelNotFound:
            return None

    def _model_view(self, spec: ModelSpec) -> ModelView:
        measured = self.store.routes(spec.name, spec.fingerprint)
        families = families_of_paths(measured) if measured is not None else predict(spec.shape)
        return ModelView(
            capabilities=sorted(families),
            capabilities_measured=measured is not None,
            aliases=list(spec.aliases),
            pinned=spec.pinned,
            load=self.manager.loads.view(spec.name),
            load_seconds=self.store.load_seconds(spec.name),
            wake_seconds=self.store.wake_seconds(spec.name),
            base=spec.base,
            chat_template_kwargs=spec.chat_template_kwargs,
            fallbacks=[n for f in spec.fallbacks if (n := self._fallback_name(f))],
            fallback_default=spec.fallback_default,
            scheduling_policy=spec.scheduling_policy,
            max_tokens=spec.max_tokens,
        )

    def snapshot(self) -> Snapshot:
        """What the gateway needs to route: models (with their load records), aliases and workers."""
        reg = self.registry
        now = time.time()
        return Snapshot(
            epoch=self.manager.epoch,
            seq=self.manager.seq,
            models={name: self._model_view(spec) for name, spec in sorted(reg.models.items())},
            aliases=dict(sorted(reg.aliases.items())),
            missing={name: str(path) for name, path in sorted(reg.missing.items())},
            workers=[w.view(now) for w in sorted(self.manager.table, key=lambda w: w.unit)],
        )

    async def host_record(self) -> HostRecord:
        """This host for the fleet: what /status shows, and where each model not
        running here would fit."""
        gpus = await self.manager.gpu_snapshot()
        snap = self.snapshot()
        live = {w.model for w in self.manager.table}
        previews: dict[str, Preview | None] = {}
        for name, spec in self.registry.models.items():
            if name in live or spec.is_adapter:
                continue
            found = self.manager.preview(spec, gpus)
            previews[name] = Preview(free_after_bytes=found[0], victims=found[1]) if found else None
        fleet = self.cfg.fleet
        return HostRecord(
            host=fleet.host_name(),
            url=fleet.advertise_url or "",
            epoch=snap.epoch,
            at=time.time(),
            gpus=self._gpu_views(gpus),
            models=snap.models,
            aliases=snap.aliases,
            workers=snap.workers,
            previews=previews,
        )

    def _gpu_views(self, gpus: list[GpuInfo]) -> list[GpuView]:
        views = {v.index: v for v in self.manager.device_views(gpus)}
        per_gpu: dict[int, list[str]] = {}
        for w in self.manager.table:
            for g in w.gpus:
                per_gpu.setdefault(g, []).append(w.unit)
        return [
            GpuView(
                index=g.index,
                uuid=g.uuid,
                name=g.name,
                simulated=self.gpus.kind == "simulated",
                memory_total_bytes=g.memory_total,
                memory_used_bytes=g.memory_used,
                memory_reserved_bytes=views[g.index].pending,
                memory_releasing_bytes=views[g.index].releasing,
                memory_free_bytes=views[g.index].free,
                utilization_pct=g.utilization_pct,
                temperature_c=g.temperature_c,
                power_w=g.power_w,
                workers=sorted(per_gpu.get(g.index, [])),
            )
            for g in gpus
        ]

    async def status(self) -> Status:
        gpus = await self.manager.gpu_snapshot()
        now = time.time()
        models = {}
        for name, spec in sorted(self.registry.models.items()):
            need = vram_need(spec, self.cfg.placement, self.store.vram_bytes(name))
            models[name] = ModelStatus(
                **self._model_view(spec).model_dump(),
                path=str(spec.path),
                weight_bytes=spec.facts.weight_bytes,
                vram_need_bytes=need.per_gpu(1),
                vram_need_source=need.source,
                measured_vram_bytes=self.store.vram_bytes(name),
                unit=unit_name(name),
                cold_starts=(trials := self.store.cold_starts(name)),
                cold_start_best=min(trials, key=lambda k: trials[k]) if trials else None,
            )
        return Status(
            epoch=self.manager.epoch,
            seq=self.manager.seq,
            ssw_version=__version__,
            uptime_s=round(now - self.started_at, 1),
            gpu_source=self.gpus.kind,
            placement_policy=self.cfg.placement.policy,
            evictions_total=self.manager.evictions,
            gpus=self._gpu_views(gpus),
            models=models,
            aliases=dict(sorted(self.registry.aliases.items())),
            missing={name: str(path) for name, path in sorted(self.registry.missing.items())},
            workers=[w.view(now) for w in sorted(self.manager.table, key=lambda w: w.unit)],
        )


# --- admin API ------------------------------------------------------------------------


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=256, description="Model name or alias.")
    wait: bool = Field(default=True, description="Answer when the model is ready (or failed) instead of at once.")
    gpu: int | None = Field(default=None, ge=0, le=63, description="Place the model's workers on this GPU.")
    protect_interactive_s: float | None = Field(
        default=None,
        ge=0,
        le=30 * 86400,
        description="For batch work: refuse (409) rather than evict a model used interactively this recently.",
    )


class StartOptions(BaseModel):
    """vLLM start options a cold-start trial may change (models.yaml's names and checks)."""

    model_config = ConfigDict(extra="forbid")
    enforce_eager: bool | None = None
    load_format: str | None = Field(default=None, pattern=r"^[a-z0-9_]{1,64}$")
    compilation_config: dict[str, Any] | None = None

    def key(self) -> str:
        """Canonical JSON of the options set: how trials are recorded."""
        return json.dumps(self.model_dump(exclude_none=True), sort_keys=True, separators=(",", ":"))


class ColdStartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=256, description="Model name or alias; it must not be loaded.")
    options: StartOptions = Field(default_factory=StartOptions, description="Start options to try ({}: as configured).")


class UsageReport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    last_used: dict[str, float] = Field(description="Worker unit -> wall time of its last request.")
    adapters: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Worker unit -> adapter -> wall time it last served that adapter."
    )
    interactive: dict[str, float] = Field(
        default_factory=dict, description="Worker unit -> wall time of its last request that was not batch work."
    )


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(default=None, max_length=256, description="Model name or alias.")
    unit: str | None = Field(
        default=None,
        max_length=256,
        description="A worker's unit name instead (ssw-worker@...): one whose model is no longer in the registry.",
    )

    @model_validator(mode="after")
    def _one(self) -> UnloadRequest:
        if (self.model is None) == (self.unit is None):
            raise ValueError("give 'model' or 'unit'")
        if self.unit is not None and parse_unit_name(self.unit) is None:
            raise ValueError(f"unit: {self.unit[:80]!r} is not a worker unit name")
        return self


JOB_ID = re.compile(r"^pull-[0-9a-f]{12}\Z")

# What the gateway's own token may do; everything else needs the admin token.
GATEWAY_PATHS = frozenset({"/events", "/load", "/usage"})


class AdminGuard:
    """ASGI middleware: a bearer token on every admin route but /health, so that
    another local account cannot load, unload or read status."""

    def __init__(self, app: Any, admin_token: str, gateway_token: str, token_file: Path) -> None:
        self.app = app
        self.admin = [admin_token]
        self.gateway = [gateway_token]
        self.token_file = token_file

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        if auth.token_matches(header, self.admin) or (
            scope["path"] in GATEWAY_PATHS and auth.token_matches(header, self.gateway)
        ):
            await self.app(scope, receive, send)
            return
        response = http_errors.error_response(
            401,
            f"the admin API needs 'Authorization: Bearer <token>'; the token is in {self.token_file}",
            "invalid_request_error",
            "invalid_admin_token",
            source="ssw-loader",
        )
        await response(scope, receive, send)


def admin_app(loader: Loader) -> FastAPI:
    app = FastAPI(title="ssw admin API", version=__version__, docs_url=None, redoc_url=None, redirect_slashes=False)
    http_errors.install(app, "ssw-loader")
    a = loader.cfg.auth
    app.add_middleware(
        AdminGuard,
        admin_token=auth.ensure_token(a.admin_token_file, a.admin_group),
        gateway_token=auth.ensure_token(a.gateway_token_file, a.gateway_group),
        token_file=a.admin_token_file,
    )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "systemd": loader.systemd.connected}

    @app.get("/status", response_model=Status)
    async def status() -> Status:
        return await loader.status()

    @app.post("/load")
    async def load(req: LoadRequest) -> JSONResponse:
        spec = await loader.resolve(req.model)
        protect_since = None
        if req.protect_interactive_s is not None:
            protect_since = time.time() - req.protect_interactive_s
            placed = await loader.resolve(spec.base) if spec.base else spec
            why = await loader.manager.evicts_protected(placed, protect_since)
            if why is not None:
                raise WouldEvict(f"loading {spec.name} for batch work would evict {why}")
        task = loader.manager.load(spec, req.gpu, protect_since=protect_since)
        if not req.wait:
            accepted = LoadAccepted(
                model=spec.name,
                load=loader.manager.loads.view(spec.name),
                epoch=loader.manager.epoch,
                seq=loader.manager.seq,
            )
            return JSONResponse(accepted.model_dump(mode="json"), status_code=202)
        workers = await asyncio.shield(task)
        now = time.time()
        return JSONResponse(
            {"model": spec.name, "state": "ready", "workers": [w.view(now).model_dump(mode="json") for w in workers]}
        )

    @app.post("/coldstart")
    async def coldstart(req: ColdStartRequest) -> dict[str, Any]:
        """Time a cold start of the model with these start options, then stop it; the
        figure is kept per option set (``cold_starts`` in /status)."""
        spec = await loader.resolve(req.model)
        options = req.options.model_dump(exclude_none=True)
        trial = await loader.manager.trial(spec, options, req.options.key())
        trials = loader.store.cold_starts(spec.name)
        return {**trial, "cold_starts": trials, "best": min(trials, key=lambda k: trials[k])}

    @app.post("/pull", status_code=202)
    async def pull(req: pulls.PullRequest) -> dict[str, Any]:
        """Download a model from the hub as a background job (GET /jobs/{id} follows it)."""
        return (await loader.puller.start(req)).model_dump(mode="json")

    @app.get("/jobs")
    async def jobs() -> dict[str, Any]:
        return {"jobs": [j.model_dump(mode="json", exclude={"files"}) for j in await loader.puller.list()]}

    async def job_or_404(job_id: str, act: Callable[[str], Awaitable[pulls.Job | None]]) -> dict[str, Any]:
        # Ids are checked before they reach Redis keys.
        found = await act(job_id) if JOB_ID.fullmatch(job_id) else None
        if found is None:
            raise JobNotFound(f"no job {clip(job_id)}")
        return found.model_dump(mode="json")

    @app.get("/jobs/{job_id}")
    async def job(job_id: str) -> dict[str, Any]:
        return await job_or_404(job_id, loader.puller.get)

    @app.delete("/jobs/{job_id}")
    async def cancel_job(job_id: str) -> dict[str, Any]:
        return await job_or_404(job_id, loader.puller.cancel)

    @app.post("/unload")
    async def unload(req: UnloadRequest) -> dict[str, Any]:
        if req.unit is not None:
            return {"unit": req.unit, "stopped": await loader.manager.unload_unit(req.unit)}
        spec = await loader.resolve(req.model or "")
        units = await loader.manager.unload(spec.name)
        return {"model": spec.name, "stopped": units}

    @app.post("/usage", status_code=204)
    async def usage(report: UsageReport) -> None:
        for unit, when in report.last_used.items():
            loader.manager.touch(unit, when, report.interactive.get(unit))
        for unit, used in report.adapters.items():
            loader.manager.touch_adapters(unit, used)

    @app.post("/rescan")
    async def rescan() -> dict[str, Any]:
        reg = await loader.rescan()
        return {"models": sorted(reg.models), "aliases": reg.aliases, "missing": sorted(reg.missing)}

    @app.get("/logs/{model}")
    async def logs(
        model: str, lines: int = Query(100, ge=1, le=journal.MAX_LINES), replica: int = Query(1, ge=1, le=16)
    ) -> dict[str, Any]:
        spec = await loader.resolve(model)
        # The replica's current unit, else the unit it would have (its last run's journal).
        running = [w.unit for w in loader.manager.table.of_model(spec.name) if w.replica == replica]
        unit = running[0] if running else unit_name(spec.name, replica)
        return {"unit": unit, "lines": await journal.tail(unit, lines, loader.cfg.systemd.journal_directory)}

    @app.get("/stats")
    async def stats(window: str = Query("5m", pattern=r"^\d{1,6}[smhd]?$")) -> dict[str, Any]:
        seconds = parse_window(window)
        try:
            return await redis_sink.request_stats(loader.redis, "ssw:", seconds)
        except (RedisError, OSError, TimeoutError) as exc:
            raise MetricsUnavailable(
                f"the metrics store (Redis at {loader.cfg.redis_url}) is unavailable: {exc}"
            ) from None

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(loader.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/events")
    async def events() -> StreamingResponse:
        return StreamingResponse(
            _event_stream(loader), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )

    return app


async def _event_stream(loader: Loader) -> AsyncIterator[bytes]:
    queue = loader.manager.subscribe()

    def frame() -> bytes:
        # JSON has no raw newline, so the snapshot is one data line of any length.
        return b"event: snapshot\ndata: " + loader.snapshot().model_dump_json().encode() + b"\n\n"

    closing = asyncio.ensure_future(loader.closing.wait())
    try:
        yield frame()
        while not loader.closing.is_set():
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait(
                {getter, closing}, timeout=EVENTS_KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED
            )
            if getter in done:
                yield frame()
            else:
                getter.cancel()
                if not done:
                    yield b": keep-alive\n\n"
    finally:
        closing.cancel()
        loader.manager.unsubscribe(queue)


def parse_window(text: str) -> float:
    """'5m' -> 300.0; a bare number is seconds."""
    unit = text[-1] if text[-1] in "smhd" else "s"
    number = float(text.rstrip("smhd"))
    return max(number * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit], 1.0)
