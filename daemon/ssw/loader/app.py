"""The loader's admin API on loopback (``127.0.0.1:8001``): status, loads and
unloads, pulls, logs, stats, metrics, and the event stream the gateway follows.
Every route but /health needs the admin token or the gateway's."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Header, Query
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from redis.exceptions import RedisError

from ssw import __version__
from ssw.common import auth, http_errors, redis_sink
from ssw.common.contract import (
    PRIORITY_RANK,
    LoadAccepted,
    Status,
)
from ssw.common.prom import CONTENT_TYPE
from ssw.common.sse import until_closed
from ssw.errors import JobNotFound, MetricsUnavailable, WouldEvict, clip
from ssw.loader.models import pulls
from ssw.loader.role import EVENTS_KEEPALIVE_S, Loader
from ssw.loader.systemd import journal
from ssw.loader.systemd.units import parse_unit_name, unit_name

log = logging.getLogger(__name__)


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
    priority: Literal["realtime", "interactive", "batch"] | None = Field(
        default=None,
        description="The priority of the request the load is for (default interactive): a realtime one may "
        "evict a worker within placement.min_residency_s of becoming ready; none evicts a worker that more "
        "urgent requests are in flight on.",
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
    reporter: str | None = Field(
        default=None, max_length=64, description="The gateway process reporting (its demand is kept apart)."
    )
    in_flight: dict[str, dict[Literal["realtime", "interactive", "batch"], int]] | None = Field(
        default=None, description="Worker unit -> priority -> requests this gateway process has in flight on it."
    )
    served: dict[str, int] = Field(
        default_factory=dict, description="Worker unit -> requests this gateway process has had answered by it."
    )


class KeepAliveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=256)
    seconds: float = Field(
        ge=-1,
        le=365 * 86400,
        description="How long the model's workers may stay idle, in place of its idle_ttl_s (Ollama's "
        "keep_alive); 0: sleep or stop them now, once their requests end; -1: until evicted or unloaded.",
    )


class ModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=256, description="Model name or alias.")


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
GATEWAY_PATHS = frozenset({"/events", "/load", "/usage", "/keep-alive", "/pull"})


def gateway_may(method: str, path: str) -> bool:
    """The gateway's own token: its paths, following a pull it started (for a key
    allowed to pull, on Ollama's /api/pull), and reading /status (for an operator's
    status page)."""
    return path in GATEWAY_PATHS or (method == "GET" and (path.startswith("/jobs/") or path == "/status"))


class AdminGuard:
    """ASGI middleware: a bearer token on every admin route but /health, so that
    another local account cannot load, unload or read status."""

    def __init__(self, app: Any, admin_token: str, gateway_token: str, token_file: Path) -> None:
        self.app = app
        self.admin = [admin_token]
        self.gateway = [gateway_token]
        self.token_file = token_file

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        # /health and /metrics are open, as the gateway's metrics listener is: read-only,
        # on loopback, and Prometheus scrapes them without holding a token that could unload.
        if (
            scope["type"] != "http"
            or scope["path"] == "/health"
            or (scope["path"] == "/metrics" and scope["method"] == "GET")
        ):
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        if auth.token_matches(header, self.admin) or (
            gateway_may(scope["method"], scope["path"]) and auth.token_matches(header, self.gateway)
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
    async def load(req: LoadRequest, traceparent: str | None = Header(None, max_length=128)) -> JSONResponse:
        spec = await loader.resolve(req.model)
        loader.traces.asked(spec.name, traceparent)
        protect_since = None
        if req.protect_interactive_s is not None:
            protect_since = time.time() - req.protect_interactive_s
            placed = await loader.resolve(spec.base) if spec.base else spec
            why = await loader.manager.warm.evicts_protected(placed, protect_since)
            if why is not None:
                raise WouldEvict(f"loading {spec.name} for batch work would evict {why}")
        rank = PRIORITY_RANK[req.priority or "interactive"]
        task = loader.manager.load(spec, req.gpu, protect_since=protect_since, rank=rank)
        if not req.wait:
            accepted = LoadAccepted(
                model=spec.name,
                load=loader.manager.loads.view(spec.name),
                epoch=loader.manager.feed.epoch,
                seq=loader.manager.feed.seq,
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
        if report.reporter is not None and report.in_flight is not None:
            in_flight = {u: {str(p): n for p, n in by.items()} for u, by in report.in_flight.items()}
            loader.manager.demand.report(report.reporter, in_flight, report.served)

    @app.post("/keep-alive")
    async def keep_alive(req: KeepAliveRequest) -> dict[str, Any]:
        spec = await loader.resolve(req.model)
        seconds = -1.0 if req.seconds < 0 else req.seconds
        retired = await loader.manager.warm.set_keep_alive(spec.name, seconds)
        return {"model": spec.name, "seconds": seconds, "pinned": spec.pinned, "retired": retired}

    @app.post("/known-answer/clear")
    async def clear_known_answer(req: ModelRequest) -> dict[str, Any]:
        """An operator's all-clear after a wrong answer: the model may sleep again, and its
        next start records its answer anew."""
        spec = await loader.resolve(req.model)
        cleared = await loader.store.clear_known_answer(spec.name)
        loader.manager.feed.changed()
        return {"model": spec.name, "cleared": cleared}

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
    queue = loader.manager.feed.subscribe()

    def frame() -> bytes:
        # JSON has no raw newline, so the snapshot is one data line of any length.
        return b"event: snapshot\ndata: " + loader.snapshot().model_dump_json().encode() + b"\n\n"

    try:
        yield frame()
        async for chunk in until_closed(queue, lambda _: frame(), loader.closing, EVENTS_KEEPALIVE_S):
            yield chunk
    finally:
        loader.manager.feed.unsubscribe(queue)


def parse_window(text: str) -> float:
    """'5m' -> 300.0; a bare number is seconds."""
    unit = text[-1] if text[-1] in "smhd" else "s"
    number = float(text.rstrip("smhd"))
    return max(number * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit], 1.0)
