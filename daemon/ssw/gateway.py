"""The gateway role: the OpenAI-compatible API on the public port.

It resolves names and aliases against the loader's pushed snapshot, holds or
answers 202 for models that are not loaded, and proxies to a worker, streaming
chunk by chunk. It never starts units itself: loads are asked of the loader.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from . import __version__, http_errors
from .config import Config
from .errors import BadRequest, LoaderUnavailable, LoadFailed, ModelLoading, ModelNotFound, UpstreamError
from .loader_client import LoaderClient
from .registry import valid_name
from .routing import RoundRobin

log = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER_S = 60
MAX_FAILOVER_ATTEMPTS = 3
SUSPECT_FOR_S = 5.0  # a worker that refused a connection is skipped this long
WAIT_HEADER = "x-ssw-wait"
_FORWARD_HEADERS = ("content-type", "accept", "x-request-id")
_CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


class Gateway:
    def __init__(self, cfg: Config, loader: LoaderClient, session: aiohttp.ClientSession) -> None:
        self.cfg = cfg
        self.loader = loader
        self.session = session
        self.rr = RoundRobin()
        self._suspect_until: dict[str, float] = {}
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=cfg.gateway.upstream_connect_timeout_s,
            sock_read=cfg.gateway.upstream_read_timeout_s,
        )

    # --- names -------------------------------------------------------------------------

    def _snapshot(self) -> dict[str, Any]:
        if self.loader.snapshot is None:
            raise LoaderUnavailable("the gateway has not reached the loader yet; retry shortly")
        return self.loader.snapshot

    def resolve(self, name: object) -> str:
        snap = self._snapshot()
        if not isinstance(name, str):
            raise BadRequest("'model' must be a string naming a model or alias")
        if valid_name(name):
            if name in snap["models"]:
                return name
            target = snap["aliases"].get(name)
            if target in snap["models"]:
                return str(target)
        raise ModelNotFound(name, sorted(snap["models"]) + sorted(snap["aliases"]))

    def ready_workers(self, model: str) -> list[dict[str, Any]]:
        now = time.monotonic()
        workers = [w for w in self._snapshot()["workers"] if w["model"] == model and w["state"] == "ready"]
        healthy = [w for w in workers if self._suspect_until.get(w["url"], 0.0) <= now]
        return healthy or workers

    # --- loading -----------------------------------------------------------------------

    async def workers_for(self, model: str, wait: bool) -> list[dict[str, Any]]:
        workers = self.ready_workers(model)
        if workers:
            return workers
        seq = await self.loader.request_load(model)
        if not wait:
            raise ModelLoading(f"model '{model}' is loading", DEFAULT_RETRY_AFTER_S)
        deadline = time.monotonic() + self.cfg.gateway.wait_timeout_s
        while True:
            snap = self._snapshot()
            if snap["seq"] >= seq:
                workers = self.ready_workers(model)
                if workers:
                    return workers
                entry = snap["models"].get(model, {})
                starting = any(w["model"] == model for w in snap["workers"])
                if not entry.get("loading") and not starting:
                    raise LoadFailed(f"loading '{model}' failed: {entry.get('last_error') or 'no worker came up'}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ModelLoading(
                    f"model '{model}' did not become ready within {self.cfg.gateway.wait_timeout_s:.0f} s",
                    DEFAULT_RETRY_AFTER_S,
                )
            await self.loader.wait_update(remaining)

    # --- proxying ----------------------------------------------------------------------

    async def forward(self, request: Request, path: str) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        if "model" not in body:
            raise BadRequest("'model' is required")
        model = self.resolve(body["model"])
        wait = request.headers.get(WAIT_HEADER, "").strip().lower() in ("1", "true", "yes")
        try:
            workers = await self.workers_for(model, wait)
        except ModelLoading as exc:
            if wait:
                raise
            return JSONResponse(
                {
                    "object": "ssw.model_loading",
                    "model": model,
                    "status": "loading",
                    "message": exc.message,
                    "retry_after_s": exc.retry_after_s,
                },
                status_code=202,
                headers={"Retry-After": str(exc.retry_after_s)},
            )

        changed = body["model"] != model
        body["model"] = model
        if path == "/v1/chat/completions":
            defaults = self._snapshot()["models"][model].get("chat_template_kwargs") or {}
            if defaults:
                kwargs = body.get("chat_template_kwargs")
                kwargs = dict(kwargs) if isinstance(kwargs, dict) else {}
                for key, value in defaults.items():
                    if key not in kwargs:
                        kwargs[key] = value
                        changed = True
                body["chat_template_kwargs"] = kwargs
        payload = json.dumps(body).encode() if changed else raw
        headers = {k: v for k in _FORWARD_HEADERS if (v := request.headers.get(k)) is not None}
        return await self._send(model, path, payload, headers, workers)

    async def _send(
        self, model: str, path: str, payload: bytes, headers: dict[str, str], workers: list[dict[str, Any]]
    ) -> Response:
        last_error: Exception | None = None
        for worker in self.rr.order(model, workers)[:MAX_FAILOVER_ATTEMPTS]:
            try:
                resp = await self.session.post(
                    worker["url"] + path, data=payload, headers=headers, timeout=self._timeout
                )
            except _CONNECT_ERRORS as exc:
                # Nothing has reached the client yet, so the next worker may serve it.
                log.warning("%s: connection failed (%s); trying the next worker", worker["unit"], exc)
                self._suspect_until[worker["url"]] = time.monotonic() + SUSPECT_FOR_S
                last_error = exc
                continue
            self.loader.used(worker["unit"])
            return await self._relay(resp)
        raise UpstreamError(f"no worker of '{model}' could be reached: {last_error}")

    @staticmethod
    async def _relay(resp: aiohttp.ClientResponse) -> Response:
        ctype = resp.headers.get("Content-Type", "application/json")
        if ctype.startswith("text/event-stream"):

            async def chunks() -> Any:
                finished = False
                try:
                    async for chunk in resp.content.iter_any():
                        yield chunk
                    finished = True
                finally:
                    # A client that left mid-stream: closing the connection makes
                    # vLLM abort the request instead of generating for nobody.
                    if finished:
                        resp.release()
                    else:
                        resp.close()

            return StreamingResponse(
                chunks(),
                status_code=resp.status,
                media_type=None,
                headers={"Content-Type": ctype, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            data = await resp.read()
        finally:
            resp.release()
        return Response(data, status_code=resp.status, headers={"Content-Type": ctype})


def gateway_app(gw: Gateway) -> FastAPI:
    app = FastAPI(title="ssw OpenAI-compatible API", version=__version__, docs_url=None, redoc_url=None)
    http_errors.install(app, "ssw-gateway")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        snap = gw.loader.snapshot or {"workers": []}
        return {
            "status": "ok",
            "loader_connected": gw.loader.connected,
            "workers_ready": sum(1 for w in snap["workers"] if w["state"] == "ready"),
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        snap = gw._snapshot()
        data = []
        for name, entry in snap["models"].items():
            states = {w["state"] for w in snap["workers"] if w["model"] == name}
            state = "ready" if "ready" in states else "loading" if entry["loading"] or states else "unloaded"
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "ssw",
                    "ssw": {"state": state, "aliases": entry["aliases"], "pinned": entry["pinned"]},
                }
            )
        for alias, target in snap["aliases"].items():
            data.append({"id": alias, "object": "model", "created": 0, "owned_by": "ssw", "ssw": {"alias_of": target}})
        return {"object": "list", "data": data}

    async def proxy(request: Request) -> Response:
        return await gw.forward(request, request.url.path)

    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        app.add_api_route(path, proxy, methods=["POST"], include_in_schema=True)

    return app
