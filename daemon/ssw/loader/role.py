"""The loader role: registry, GPUs and workers, behind the admin API on loopback.

It is the only part of ssw that talks to systemd. The gateway learns the
workers from its ``GET /events`` stream and asks it for loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from redis.exceptions import RedisError

from ssw import __version__
from ssw.common import redis_sink
from ssw.common.contract import (
    GpuView,
    HostRecord,
    ModelDetails,
    ModelStatus,
    ModelView,
    Preview,
    Snapshot,
    SplitView,
    Status,
    valid_name,
)
from ssw.common.routes import families_of_paths
from ssw.common.states import LEAVING, LoadState, WorkerState
from ssw.common.tracing import Tracing
from ssw.config import Config
from ssw.errors import ModelNotFound, SswError
from ssw.loader.decide import tiers
from ssw.loader.decide.vram import vram_need
from ssw.loader.gpus import GpuInfo, GpuSource
from ssw.loader.metrics import LoaderMetrics
from ssw.loader.models import pulls
from ssw.loader.models.capabilities import predict
from ssw.loader.models.catalog import Catalog
from ssw.loader.models.registry import ModelSpec, Registry, scan
from ssw.loader.publish import Publisher
from ssw.loader.store import FactStore, Retiring
from ssw.loader.systemd.bus import Systemd
from ssw.loader.systemd.units import unit_name
from ssw.loader.traces import LoadTraces
from ssw.loader.workers.parts import Parts
from ssw.loader.workers.progress import progress
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
        self.catalog = Catalog(registry)
        self.store = store
        # The parts every piece of the machinery shares, built once here.
        parts = Parts.build(cfg, systemd, gpus, self.catalog, store, retiring)
        self.manager = Supervisor(parts, self._load_result, self._check_failed)
        self.started_at = time.time()
        self.redis = redis_sink.client(cfg.redis_url)
        self.latest_gpus: list[GpuInfo] = []
        self.metrics = LoaderMetrics(
            worker_counts=self.manager.table.counts,
            evictions=lambda: self.manager.warm.evictions,
            gpus=lambda: self.latest_gpus,
            reserved=lambda: {v.index: v.pending for v in self.manager.inventory.device_views(self.latest_gpus)},
        )
        host = cfg.fleet.host_name() if cfg.fleet.enabled else None
        self.tracing = Tracing(cfg.tracing, "ssw-loader", host)
        self.traces = LoadTraces(self.tracing)
        parts.lifecycle.listeners.append(self.traces.observe)
        parts.lifecycle.listeners.append(self.metrics.observe)
        parts.lifecycle.check_listeners.append(self.metrics.check_failed)
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
        self.fleet = (
            Publisher(cfg.fleet, self.host_record, lambda: any(w.part for w in self.manager.table))
            if cfg.fleet.enabled
            else None
        )
        self._last_scan = time.monotonic()
        # Set on shutdown so the open event streams end and the server can stop.
        self.closing = asyncio.Event()

    @property
    def registry(self) -> Registry:
        return self.catalog.registry

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
        self.latest_gpus = await self.manager.inventory.gpu_snapshot()
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
        await asyncio.to_thread(self.tracing.close)

    def _check_failed(self, model: str, after: str) -> None:
        self.metrics.known_answer_failures.labels(model, after).inc()

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
                gpus = await self.manager.inventory.gpu_snapshot()
            except Exception:  # a driver hiccup must not end sampling
                log.exception("GPU sampling failed")
                continue
            self.latest_gpus = gpus
            self.manager.inventory.update_held(gpus)
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
        self.catalog.registry = await asyncio.to_thread(scan, self.cfg.models_dir, self.cfg.models_file)
        self._last_scan = time.monotonic()
        self.manager.feed.changed()
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
        load = self.manager.loads.view(spec.name)
        rec_since = load.since if load.state is LoadState.LOADING else None
        moving = progress(
            self.manager.table.of_model(spec.name),
            rec_since,
            self.store.load_seconds(spec.name),
            lambda level: self.store.wake_seconds(spec.name, level or None),
        )
        if moving is not None:
            load = load.model_copy(update={"progress": moving})
        return ModelView(
            capabilities=sorted(families),
            capabilities_measured=measured is not None,
            aliases=list(spec.aliases),
            pinned=spec.pinned,
            load=load,
            load_seconds=self.store.load_seconds(spec.name),
            wake_seconds=self.store.wake_seconds(spec.name),
            base=spec.base,
            chat_template_kwargs=spec.chat_template_kwargs,
            fallbacks=[n for f in spec.fallbacks if (n := self._fallback_name(f))],
            fallback_default=spec.fallback_default,
            scheduling_policy=spec.scheduling_policy,
            max_tokens=spec.max_tokens,
            details=_details(spec),
            idle_ttl_s=self.manager.warm.idle_ttl(spec.name)[0],
        )

    def snapshot(self) -> Snapshot:
        """What the gateway needs to route: models (with their load records), aliases and workers."""
        reg = self.registry
        now = time.time()
        return Snapshot(
            epoch=self.manager.feed.epoch,
            seq=self.manager.feed.seq,
            models={name: self._model_view(spec) for name, spec in sorted(reg.models.items())},
            aliases=dict(sorted(reg.aliases.items())),
            splits={
                name: SplitView(shares=shares, sticky=sticky) for name, (shares, sticky) in sorted(reg.splits.items())
            },
            missing={name: str(path) for name, path in sorted(reg.missing.items())},
            workers=[w.view(now) for w in sorted(self.manager.table, key=lambda w: w.unit)],
        )

    async def host_record(self) -> HostRecord:
        """This host for the fleet: what /status shows, and where each model not
        running here would fit."""
        gpus = await self.manager.inventory.gpu_snapshot()
        snap = self.snapshot()
        live = {w.model for w in self.manager.table}
        staying = {w.model for w in self.manager.table if w.state not in LEAVING}
        previews: dict[str, Preview | None] = {}
        for name, spec in self.registry.models.items():
            # A model across hosts may take a rank here again while an earlier one is leaving.
            if spec.is_adapter or name in (staying if spec.span else live):
                continue
            found = self.manager.inventory.preview(spec, gpus)
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
            rank_address=fleet.rank_address(),
        )

    def _gpu_views(self, gpus: list[GpuInfo]) -> list[GpuView]:
        views = {v.index: v for v in self.manager.inventory.device_views(gpus)}
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
        gpus = await self.manager.inventory.gpu_snapshot()
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
                known_answer=self.store.known_answer_status(name),
            )
        return Status(
            epoch=self.manager.feed.epoch,
            seq=self.manager.feed.seq,
            ssw_version=__version__,
            uptime_s=round(now - self.started_at, 1),
            gpu_source=self.gpus.kind,
            placement_policy=self.cfg.placement.policy,
            evictions_total=self.manager.warm.evictions,
            gpus=self._gpu_views(gpus),
            models=models,
            aliases=dict(sorted(self.registry.aliases.items())),
            missing={name: str(path) for name, path in sorted(self.registry.missing.items())},
            workers=[w.view(now) for w in sorted(self.manager.table, key=lambda w: w.unit)],
            events=self.manager.parts.lifecycle.events(),
        )


# Bytes per parameter by dtype, to estimate a model's parameters from its weights' size.
BYTES_PER_PARAMETER = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "float8": 1.0, "int8": 1.0}
QUANTIZED_BYTES_PER_PARAMETER = {"awq": 0.5, "gptq": 0.5, "bitsandbytes": 0.5, "fp8": 1.0}


def _details(spec: ModelSpec) -> ModelDetails:
    f = spec.facts
    per = QUANTIZED_BYTES_PER_PARAMETER.get(f.quantization or "") or BYTES_PER_PARAMETER.get(f.dtype or "", 2.0)
    return ModelDetails(
        family=f.model_type,
        architectures=list(f.architectures),
        dtype=f.dtype,
        quantization=f.quantization,
        weight_bytes=f.weight_bytes,
        parameters=int(f.weight_bytes / per) if f.weight_bytes else None,
        context_length=spec.max_model_len or f.max_position_embeddings,
        modified_at=f.modified_at,
        vision=f.vision,
        chat_template=f.chat_template,
    )
