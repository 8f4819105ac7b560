"""The gateway's ASGI apps: the public port (the proxy routes go straight to the
handler, FastAPI serves the rest: /health, /v1/models, the OpenAPI document),
the fleet listener (hops only), and the metrics ports."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import generate_latest
from starlette.routing import Match

from ssw import __version__
from ssw.common import http_errors
from ssw.common.bodies import parse_body
from ssw.common.prom import CONTENT_TYPE, label_host
from ssw.common.routes import ROUTES, match
from ssw.common.states import WorkerState
from ssw.errors import ModelNotFound, NotServed, PayloadTooLarge, RequestTimeout, SswError
from ssw.gateway import hops
from ssw.gateway.admission import FLEET_LISTENER, body_chunks
from ssw.gateway.board.routes import PAGE_FILES, STREAM_PATH, install_page
from ssw.gateway.board.stream import Board
from ssw.gateway.fleet import LOAD_PATH
from ssw.gateway.handler import SOURCE, Gateway
from ssw.gateway.metrics import pool_registry
from ssw.gateway.ollama.app import OllamaApp
from ssw.gateway.openapi import openapi_extra
from ssw.gateway.pool import GatewayPool
from ssw.gateway.relay import Receive, Reply, Send

# FastAPI's routes that anyone may call: the rest need a key before their body is read.
# (The fleet's load route checks its own credential before it reads a byte.)
# The status page's files hold no data; its stream checks its own caller (an operator).
OPEN_PATHS = frozenset({"/health", "/openapi.json", "/metrics", LOAD_PATH, *PAGE_FILES, STREAM_PATH})
UPLOAD_PATH = "/v1/files"
FORM_SLACK = 64 * 1024  # the multipart form around an uploaded file


class GatewayApp:
    """The public ASGI app: the proxy routes go straight to the gateway's handler,
    everything else to FastAPI, behind a key check and a bounded body."""

    def __init__(self, gw: Gateway, api: FastAPI, board: Board) -> None:
        self.gw = gw
        self.api = api
        self.ollama = OllamaApp(gw)
        self.board = board

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            found = match(scope["method"], scope["path"])
            if found is not None:
                await self.gw.proxy(scope, receive, send, *found)
                return
            if OllamaApp.serves(scope["path"]):
                await self.ollama(scope, receive, send)
                return
            try:
                receive = self._guard(scope, receive)
            except SswError as exc:
                await Reply(send).error(exc, SOURCE)
                return
        # Everything else, vLLM's control and development paths included, is FastAPI's 404.
        await self.api(scope, receive, send)

    def _guard(self, scope: dict[str, Any], receive: Receive) -> Receive:
        """Authenticate before any body is read (on routes that exist: any other path
        is the same 404 for everyone), and cap the body in size and time."""
        limits = self.gw.cfg.limits
        if scope["path"] not in OPEN_PATHS and self._routed(scope):
            self.gw.admission.authenticate(scope["headers"])
        if scope["method"] == "POST" and scope["path"] == UPLOAD_PATH:
            limit = self.gw.cfg.batch.max_file_bytes + FORM_SLACK
            timeout = limits.body_timeout_s + limit / limits.min_body_rate_bytes_s
        else:
            limit, timeout = limits.max_body_bytes, limits.body_timeout_s
        return bounded_body(receive, dict(scope["headers"]).get(b"content-length"), limit, timeout)

    def _routed(self, scope: dict[str, Any]) -> bool:
        return any(route.matches(scope)[0] is not Match.NONE for route in self.api.router.routes)


class FleetApp:
    """The fleet listener: the same gateway, for hops from the other hosts' gateways only
    (each with a signed claim), on the fleet's network and over TLS. The public port never
    takes a hop, and this one serves nothing else."""

    def __init__(self, public: GatewayApp) -> None:
        self.public = public

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        scope[FLEET_LISTENER] = True
        if match(scope["method"], scope["path"]) is not None or scope["path"] in (LOAD_PATH, "/health"):
            await self.public(scope, receive, send)
            return
        await Reply(send).error(NotServed(f"the fleet listener serves hops only, not {scope['path'][:80]}"), SOURCE)


def bounded_body(receive: Receive, declared: bytes | None, limit: int, timeout: float) -> Receive:
    """``receive`` that fails (413, 408) once the body passes ``limit`` bytes or has not
    all arrived within ``timeout`` s of the first read; after the body, as it was."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
    size = 0
    deadline: float | None = None
    done = False

    async def read() -> Any:
        nonlocal size, deadline, done
        if done:
            return await receive()  # a disconnect, while the answer is sent
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            raise RequestTimeout(f"the request body did not arrive within {timeout:.0f} s") from None
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
            done = not message.get("more_body", False)
        return message

    return read


def gateway_app(gw: Gateway) -> GatewayApp:
    app = FastAPI(
        title="ssw OpenAI-compatible API", version=__version__, docs_url=None, redoc_url=None, redirect_slashes=False
    )
    http_errors.install(app, SOURCE)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        loader = gw.loader
        snap = loader.snapshot
        return {
            "status": "ok",
            "loader_connected": loader.connected,
            "loader_epoch": snap.epoch if snap else None,
            "loader_error": loader.last_error,
            "snapshot_age_s": round(time.monotonic() - loader.snapshot_at, 1) if snap else None,
            "workers_ready": sum(1 for w in snap.workers if w.state is WorkerState.READY) if snap else 0,
            "waiting": {m: gw.queue.depth(m) for m in gw.queue.models()},
            "requests_in_flight": gw.in_flight(),
            "fleet": None
            if gw.fleet is None
            else {
                "host": gw.fleet.host,
                "connected": gw.fleet.connected,
                "error": gw.fleet.last_error,
                "hosts": sorted(gw.fleet.hosts),
                # hosts this one could not reach lately, whatever their records say
                "unreachable": sorted(h for h in gw.fleet.hosts if not gw.fleet.reachable(h)),
            },
        }

    @app.post(LOAD_PATH, status_code=202, include_in_schema=False)
    async def fleet_load(request: Request) -> dict[str, Any]:
        """Another host's gateway asks this host to load a model (the fleet decided it
        loads here), for one of its clients: on the fleet listener, with a signed claim."""
        scope: dict[str, Any] = dict(request.scope)
        claim, key = gw.admission.hop_caller(scope)
        declared = dict(scope["headers"]).get(b"content-length")
        raw = await gw.admission.read_body(declared, body_chunks(request.receive), 4096)
        hops.check_body(claim, raw)
        body = parse_body(raw, 4)
        names = gw.names
        model = gw.admission.resolve_in_scope(key, body.get("model"), names)
        if model not in names.snap.models:
            raise ModelNotFound(model, sorted(names.snap.models))
        accepted = await gw.loader.request_load(model, priority=claim.priority)
        assert gw.fleet is not None
        return {"model": model, "host": gw.fleet.host, "load": accepted.load.model_dump(mode="json")}

    board = Board(gw)
    gw.accounting.series = board.series
    install_page(app, gw, board)

    if gw.cfg.gateway.public_metrics:
        app.add_api_route("/metrics", metrics_endpoint(gw), methods=["GET"], include_in_schema=False)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        key = gw.admission.authenticate(request.headers.raw)
        names = gw.names
        allowed = gw.admission.allowed_models(key, names.expand)
        now = time.time()
        data = []
        for name, entry in names.models.items():
            if allowed is not None and name not in allowed:
                continue
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "ssw",
                    "ssw": {
                        "state": names.state(name),
                        **({"progress": p.describe(now)} if (p := names.progress(name)) is not None else {}),
                        "aliases": entry.aliases,
                        "pinned": entry.pinned,
                        "capabilities": entry.capabilities,
                        "capabilities_measured": entry.capabilities_measured,
                        **({"base": entry.base} if entry.base else {}),
                        **({"hosts": names.hosts.get(name, {})} if gw.fleet is not None else {}),
                    },
                }
            )
        for alias, target in names.aliases.items():
            if allowed is not None and target not in allowed:
                continue
            data.append({"id": alias, "object": "model", "created": 0, "owned_by": "ssw", "ssw": {"alias_of": target}})
        for split_name, split in names.splits.items():
            members = names.expand(split_name)
            if not members or (allowed is not None and not members & allowed):
                continue
            view = {"split_of": {m: s for m, s in split.shares.items() if m in members}, "sticky": split.sticky}
            data.append({"id": split_name, "object": "model", "created": 0, "owned_by": "ssw", "ssw": view})
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    async def documented_only(request: Request) -> Response:
        # GatewayApp serves these paths; the route is here for the OpenAPI document.
        return Response(status_code=405)

    for route in ROUTES:
        path = route.path.replace("{id}", "{response_id}")
        app.add_api_route(
            path,
            documented_only,
            methods=[route.method],
            openapi_extra=openapi_extra(route),
            summary=f"{route.family.value}: relayed to a worker of the model",
        )

    return GatewayApp(gw, app, board)


def metrics_endpoint(gw: Gateway) -> Any:
    async def metrics() -> Response:
        return Response(gw.metrics.render(), media_type=CONTENT_TYPE)

    return metrics


def metrics_app(gw: Gateway) -> FastAPI:
    """The gateway's Prometheus endpoint on its own loopback listener."""
    app = FastAPI(title="ssw gateway metrics", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.add_api_route("/metrics", metrics_endpoint(gw), methods=["GET"])
    return app


def pool_metrics_app(pool: GatewayPool) -> FastAPI:
    """The series of several gateway processes, added up, served by their parent."""
    registry = pool_registry(pool.metrics_dir)
    app = FastAPI(title="ssw gateway metrics", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)

    async def metrics() -> Response:
        host = pool.cfg.fleet.host_name() if pool.cfg.fleet.enabled else None
        return Response(label_host(generate_latest(registry), host), media_type=CONTENT_TYPE)

    app.add_api_route("/metrics", metrics, methods=["GET"])
    return app
