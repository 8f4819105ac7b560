"""The gateway role: the OpenAI-compatible API on the public port.

A request passes admission (:mod:`ssw.admission`), is resolved by name or
alias against the loader's pushed snapshot, finds a ready worker (or is held
while its model loads, or answered 202 or 503, as ``gateway.not_loaded`` and
the request say), and is relayed to the worker (:mod:`ssw.relay`); what it did
is accounted for once it is answered (:mod:`ssw.accounting`). The gateway
never starts units itself: loads are asked of the loader.

The proxy routes are served by a plain ASGI handler; FastAPI serves the rest
(/health, /v1/models) and publishes the OpenAPI document for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import generate_latest

from . import __version__, http_errors
from .accounting import Accounting, Exchange
from .admission import Admission, parse_body
from .auth import ApiKey, KeyRing
from .config import Config
from .contract import ModelView, Snapshot, WorkerView
from .errors import (
    BadRequest,
    LoaderUnavailable,
    LoadFailed,
    ModelLoading,
    ModelNotFound,
    NoCapacity,
    SswError,
    UpstreamError,
)
from .gateway_pool import GatewayPool
from .lifecycle import LIVE, Failure, LoadState, WorkerState
from .loader_client import LoaderClient
from .prom import CONTENT_TYPE, GatewayMetrics, pool_registry
from .registry import valid_name
from .relay import Receive, Relay, Reply, Send
from .waitqueue import VLLM_PRIORITY, WaitQueue, parse_priority

log = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER_S = 60  # when a model has never loaded here
WAIT_HEADER = b"x-ssw-wait"
PRIORITY_HEADER = b"x-ssw-priority"
FALLBACK_HEADER = b"x-ssw-fallback"
FALLBACK_FROM_HEADER = b"x-ssw-fallback-from"
FORWARD_HEADERS = (b"accept", b"x-request-id")
PROXY_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
SOURCE = "ssw-gateway"


def _truthy(value: bytes | None) -> bool | None:
    if value is None:
        return None
    return value.strip().lower() in (b"1", b"true", b"yes")


class Names:
    """Names, aliases and workers as of one snapshot, indexed for the hot path."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap
        self.ready: dict[str, list[WorkerView]] = {}
        self.live: dict[str, list[WorkerView]] = {}
        for w in snap.workers:
            if w.state is WorkerState.READY:
                self.ready.setdefault(w.model, []).append(w)
            if w.state in LIVE:
                self.live.setdefault(w.model, []).append(w)

    def resolve(self, name: object) -> str:
        if not isinstance(name, str):
            raise BadRequest("'model' must be a string naming a model or alias")
        models = self.snap.models
        if valid_name(name):
            if name in models:
                return name
            target = self.snap.aliases.get(name)
            if target in models:
                return target
        raise ModelNotFound(name, sorted(models) + sorted(self.snap.aliases))

    def state(self, model: str) -> str:
        """ready, loading or unloaded, as /v1/models says."""
        if model in self.ready:
            return "ready"
        entry = self.snap.models[model]
        if model in self.live or entry.load.state in (LoadState.LOADING, LoadState.BACKING_OFF):
            return "loading"
        return "unloaded"


class Gateway:
    def __init__(self, cfg: Config, loader: LoaderClient) -> None:
        self.cfg = cfg
        self.loader = loader
        self.metrics = GatewayMetrics()
        self.queue = WaitQueue(
            cfg.gateway.max_waiters_per_model, lambda model, depth: self.metrics.waiting.labels(model).set(depth)
        )
        self.keys = KeyRing(cfg.auth.keys_file)
        self.keys.reload()
        self.admission = Admission(cfg, self.keys)
        self.accounting = Accounting(cfg, self.metrics)
        self.relay = Relay(cfg, loader.used)
        self._names: Names | None = None
        # model -> (epoch, seq) of the snapshot that reflects its load request
        self._asked: dict[str, tuple[str, int]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        loader.on_snapshot(self._on_snapshot)

    async def close(self) -> None:
        await self.relay.pool.close()

    # --- names ---------------------------------------------------------------------------

    @property
    def names(self) -> Names:
        snap = self.loader.snapshot
        if snap is None:
            raise LoaderUnavailable("the gateway has not reached the loader yet; retry shortly")
        if self._names is None or self._names.snap is not snap:
            self._names = Names(snap)
        return self._names

    def in_flight(self) -> int:
        return self.relay.in_flight()

    def retry_after(self, model: str) -> int:
        """An honest wait: the model's measured load time less what has passed, plus
        what is left of a backoff."""
        entry = self.names.snap.models.get(model)
        if entry is None:
            return DEFAULT_RETRY_AFTER_S
        load_s = entry.load_seconds or DEFAULT_RETRY_AFTER_S
        rec = entry.load
        now = time.time()
        if rec.state is LoadState.BACKING_OFF and rec.deadline:
            return max(1, math.ceil(rec.deadline - now + load_s))
        if rec.state is LoadState.COOLING_DOWN and rec.deadline:
            return max(1, math.ceil(rec.deadline - now))
        if rec.state is LoadState.LOADING and entry.load_seconds:
            return max(1, math.ceil(load_s - (now - rec.since)))
        return max(1, math.ceil(load_s))

    # --- waiting for loads -------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_snapshot(self, snap: Snapshot, restarted: bool) -> None:
        """Release or fail waiters as soon as the loader's news arrives; after a loader
        restart, ask again for the loads they wait for."""
        self._check_waiters(restarted)

    def _check_waiters(self, restarted: bool = False) -> None:
        names = self.names  # the latest snapshot, and nothing older
        snap = names.snap
        for model in self.queue.models():
            if model in names.ready:
                released = self.queue.release(model)
                log.info("%s: ready; released %d waiting requests", model, len(released))
                continue
            entry = snap.models.get(model)
            if entry is None:
                self.queue.fail(model, ModelNotFound(model, sorted(snap.models)))
                continue
            if restarted and model not in names.live and entry.load.state is LoadState.IDLE:
                self._spawn(self._ask_again(model))
                continue
            failure = self._failure(model, entry, names)
            if failure is not None:
                self.queue.fail(model, failure)

    def _failure(self, model: str, entry: ModelView, names: Names) -> SswError | None:
        """Why the waiters of a model will not be served, if the snapshot says so."""
        rec = entry.load
        if rec.state is LoadState.COOLING_DOWN:
            return LoadFailed.cooling_down(model, (rec.deadline or 0) - time.time(), rec.last_error or rec.reason)
        if rec.state is LoadState.IDLE and model not in names.live:
            asked = self._asked.get(model)
            if asked is None or asked[0] != names.snap.epoch or names.snap.seq < asked[1]:
                return None  # this snapshot predates the load request
            why = rec.last_error or rec.reason or "no worker came up"
            if rec.reason.startswith(Failure.NO_ROOM.value):
                return NoCapacity(why)
            return LoadFailed(f"loading '{model}' failed: {why}", self.retry_after(model))
        return None

    async def _ask_again(self, model: str) -> None:
        try:
            accepted = await self.loader.request_load(model)
        except SswError as exc:
            self.queue.fail(model, exc)
            return
        self._asked[model] = (accepted.epoch, accepted.seq)

    async def workers_for(self, model: str, mode: str, priority: str, reply: Reply, stream: bool) -> list[WorkerView]:
        """The model's ready workers; while it is not ready, hold the request (mode
        'wait'), or raise ModelLoading for a 202 or 503 answer."""
        names = self.names
        workers = names.ready.get(model)
        if workers:
            return workers
        entry = names.snap.models[model]
        rec = entry.load
        if rec.state is LoadState.COOLING_DOWN:
            failure = self._failure(model, entry, names)
            assert failure is not None
            raise failure
        if rec.state is LoadState.IDLE and model not in names.live:
            accepted = await self.loader.request_load(model)
            self._asked[model] = (accepted.epoch, accepted.seq)
        else:
            self._asked.setdefault(model, (names.snap.epoch, names.snap.seq))
        retry = self.retry_after(model)
        if mode != "wait":
            raise ModelLoading(f"model '{model}' is loading", retry)
        waiter = self.queue.add(model, priority, retry)
        self._check_waiters()  # it may have become ready (or failed) meanwhile
        keepalive = self._spawn_keepalive(reply) if stream else None
        try:
            async with asyncio.timeout(self.cfg.gateway.wait_timeout_s):
                await waiter.future
        except TimeoutError:
            self.queue.discard(waiter)
            raise ModelLoading(
                f"model '{model}' did not become ready within {self.cfg.gateway.wait_timeout_s:.0f} s",
                self.retry_after(model),
            ) from None
        finally:
            if keepalive is not None:
                keepalive.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keepalive
        workers = self.names.ready.get(model)
        if not workers:
            raise UpstreamError(f"model '{model}' was ready but its worker is gone again; retry")
        return workers

    def _spawn_keepalive(self, reply: Reply) -> asyncio.Task[None]:
        async def beat() -> None:
            interval = self.cfg.gateway.keepalive_s
            await asyncio.sleep(interval)
            # Held this long: start the event stream, so that proxies and clients see life.
            if not reply.started:
                await reply.start_sse()
            while True:
                await reply.body(b": ssw: waiting for the model to load\n\n")
                await asyncio.sleep(interval)

        return asyncio.ensure_future(beat())

    def not_loaded_mode(self, key: ApiKey | None, wait_header: bool | None, sdk: bool) -> str:
        """wait, accept or unavailable: X-SSW-Wait first, then the key's setting, then
        gateway.not_loaded. An official OpenAI SDK reads any 2xx as a completion (a
        202 became one without choices, a stream with no chunk), so where the answer
        would be 'accept' it gets the same news as a 503 with Retry-After, which the
        SDKs retry honouring the header."""
        mode = (key.not_loaded if key else None) or self.cfg.gateway.not_loaded
        if wait_header is True:
            return "wait"
        if wait_header is False and mode == "wait":
            mode = "unavailable"
        if mode == "accept" and sdk:
            return "unavailable"
        return mode

    async def _serve_or_fallback(
        self,
        key: ApiKey | None,
        model: str,
        body: dict[str, Any],
        path: str,
        mode: str,
        priority: str,
        fallback: bool | None,
        reply: Reply,
        stream: bool,
    ) -> tuple[str, list[WorkerView], str | None]:
        """(model that serves, its workers, the model it stands in for or None)."""
        try:
            return model, await self.workers_for(model, mode, priority, reply, stream), None
        except (LoadFailed, NoCapacity) as exc:
            names = self.names
            entry = names.snap.models.get(model)
            allowed = fallback if fallback is not None else bool(entry and entry.fallback_default)
            if entry is None or not allowed:
                raise
            in_scope = self.admission.allowed_models(key, names.resolve)
            for candidate in entry.fallbacks:
                candidate_entry = names.snap.models.get(candidate)
                workers = names.ready.get(candidate)
                if candidate_entry is None or not workers:
                    continue
                if in_scope is not None and candidate not in in_scope:
                    continue  # a fallback never widens what the key may use
                try:
                    self.admission.validate(body, path, candidate_entry.max_tokens)
                except BadRequest:
                    continue  # nor the limits the fallback has
                log.info("%s cannot serve (%s); falling back to %s", model, exc.message, candidate)
                return candidate, workers, model
            raise

    # --- the proxy routes --------------------------------------------------------------------

    async def proxy(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        ex = Exchange(route=scope["path"])
        reply = Reply(send)
        try:
            await self._proxy(scope, receive, reply, ex)
        except SswError as exc:
            ex.status, ex.error = exc.status, exc.code or exc.type
            if isinstance(exc, ModelLoading) and exc.accepted:
                await reply.whole(202, orjson.dumps(exc.accepted), [(b"retry-after", b"%d" % exc.retry_after_s)])
                ex.status = 202
            elif not reply.ended:
                await reply.error(exc, SOURCE)
        except Exception:
            log.exception("unhandled error in the gateway")
            ex.status, ex.error = 500, "internal_error"
            if not reply.started:
                await reply.error(SswError("internal error in ssw; see its journal"), SOURCE)
        finally:
            self.admission.release(ex)
            self.accounting.finish(ex)

    async def _proxy(self, scope: dict[str, Any], receive: Receive, reply: Reply, ex: Exchange) -> None:
        path: str = scope["path"]
        headers: dict[bytes, bytes] = dict(scope["headers"])
        key = self.admission.authenticate(scope["headers"])
        ex.key = key.name if key else ""
        self.admission.admit(key, ex)
        raw = await self.admission.read_body(headers.get(b"content-length"), _body(receive))
        body = parse_body(raw, self.cfg.limits.max_json_depth)
        if "model" not in body:
            raise BadRequest("'model' is required")
        ex.stream = stream = body.get("stream") is True
        priority = parse_priority(headers[PRIORITY_HEADER].decode("latin-1") if PRIORITY_HEADER in headers else None)
        ex.priority = priority
        names = self.names
        asked = body["model"]
        try:
            resolved: str | None = names.resolve(asked)
        except (ModelNotFound, BadRequest):
            resolved = None
        # Outside the key's scope the answer is the same whether or not the model exists.
        self.admission.check_scope(key, asked if isinstance(asked, str) else "", resolved, names.resolve)
        model = names.resolve(asked)
        ex.model = model
        entry = names.snap.models[model]
        self.admission.validate(body, path, entry.max_tokens)
        sdk = any(name.startswith(b"x-stainless-") for name in headers)
        mode = self.not_loaded_mode(key, _truthy(headers.get(WAIT_HEADER)), sdk)
        try:
            served, workers, stands_in_for = await self._serve_or_fallback(
                key, model, body, path, mode, priority, _truthy(headers.get(FALLBACK_HEADER)), reply, stream
            )
        except ModelLoading as exc:
            if mode == "accept" and not reply.started:
                exc.accepted = {
                    "object": "ssw.model_loading",
                    "model": model,
                    "status": "loading",
                    "message": exc.message,
                    "retry_after_s": exc.retry_after_s,
                }
            raise
        ex.model = served
        payload = self._payload(body, raw, path, served, priority, ex, asked)
        head = _request_head(path, payload, headers)
        if stands_in_for is not None:
            reply.extra_headers.append((FALLBACK_FROM_HEADER, stands_in_for.encode()))
        await self.relay.forward(served, head, payload, workers, ex, reply, receive)

    def _payload(
        self, body: dict[str, Any], raw: bytes, path: str, served: str, priority: str, ex: Exchange, asked: object
    ) -> bytes:
        """The body the worker gets: the client's bytes unless ssw had to change something."""
        changed = asked != served
        body["model"] = served
        if ex.stream and path != "/v1/embeddings":
            options = body.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage")):
                # Token counts come from vLLM's usage chunk; the client did not
                # ask for it, so it is taken out of their stream again.
                body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
                ex.strip_usage = changed = True
        entry = self.names.snap.models[served]
        if path == "/v1/chat/completions" and entry.chat_template_kwargs:
            kwargs = body.get("chat_template_kwargs")
            kwargs = dict(kwargs) if isinstance(kwargs, dict) else {}
            for name, value in entry.chat_template_kwargs.items():
                if name not in kwargs:
                    kwargs[name] = value
                    changed = True
            body["chat_template_kwargs"] = kwargs
        if entry.scheduling_policy == "priority" and "priority" not in body:
            body["priority"] = VLLM_PRIORITY[priority]
            changed = True
        return orjson.dumps(body) if changed else raw


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("the client left before sending its whole body")
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


def _request_head(path: str, payload: bytes, headers: dict[bytes, bytes]) -> bytes:
    lines = [
        b"POST " + path.encode() + b" HTTP/1.1",
        b"host: localhost",
        b"content-type: application/json",
        b"content-length: %d" % len(payload),
    ]
    for name in FORWARD_HEADERS:
        value = headers.get(name)
        if value is not None:
            lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n"


# --- the apps ------------------------------------------------------------------------------------

# The request bodies ssw reads; every other field passes through to vLLM, so
# the schemas allow additional properties. Published at /openapi.json.
_MODEL = {"type": "string", "description": "A model name or alias."}
_MAX_TOKENS = {"type": "integer", "minimum": 1}
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
REQUEST_SCHEMAS: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            "model": _MODEL,
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["role"],
                    "properties": {"role": {"type": "string", "enum": list(CHAT_ROLES)}, "content": {}},
                },
            },
            "max_tokens": _MAX_TOKENS,
            "max_completion_tokens": _MAX_TOKENS,
            "stream": {"type": "boolean"},
        },
    },
    "/v1/completions": {
        "type": "object",
        "required": ["model", "prompt"],
        "properties": {"model": _MODEL, "prompt": {}, "max_tokens": _MAX_TOKENS, "stream": {"type": "boolean"}},
    },
    "/v1/embeddings": {
        "type": "object",
        "required": ["model", "input"],
        "properties": {"model": _MODEL, "input": {}},
    },
}
_ERROR = {"description": "An OpenAI error envelope.", "content": {"application/json": {"schema": {"type": "object"}}}}


def _openapi(schema: dict[str, Any]) -> dict[str, Any]:
    header = {"in": "header", "required": False, "schema": {"type": "string"}}
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        "parameters": [
            {**header, "name": "Authorization", "description": "Bearer <API key>"},
            {**header, "name": "X-SSW-Wait", "description": "true: hold the request while the model loads"},
            {
                **header,
                "name": "X-SSW-Priority",
                "schema": {"type": "string", "enum": ["realtime", "interactive", "batch"]},
            },
            {**header, "name": "X-SSW-Fallback", "description": "true: a fallback model may answer"},
        ],
        "responses": {
            "200": {"description": "The worker's answer (JSON, or server-sent events when streaming)."},
            "202": {"description": "The model is loading; retry after Retry-After seconds (not_loaded: accept)."},
            **{code: _ERROR for code in ("400", "401", "403", "404", "408", "413", "422", "429", "431", "503")},
        },
    }


class GatewayApp:
    """The public ASGI app: the proxy routes go straight to the gateway's handler,
    everything else to FastAPI."""

    def __init__(self, gw: Gateway, api: FastAPI) -> None:
        self.gw = gw
        self.api = api

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in PROXY_ROUTES:
            await self.gw.proxy(scope, receive, send)
            return
        await self.api(scope, receive, send)


def gateway_app(gw: Gateway) -> GatewayApp:
    app = FastAPI(title="ssw OpenAI-compatible API", version=__version__, docs_url=None, redoc_url=None)
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
        }

    if gw.cfg.gateway.public_metrics:
        app.add_api_route("/metrics", metrics_endpoint(gw), methods=["GET"], include_in_schema=False)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        key = gw.admission.authenticate(request.headers.raw)
        names = gw.names
        allowed = gw.admission.allowed_models(key, names.resolve)
        data = []
        for name, entry in names.snap.models.items():
            if allowed is not None and name not in allowed:
                continue
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "ssw",
                    "ssw": {"state": names.state(name), "aliases": entry.aliases, "pinned": entry.pinned},
                }
            )
        for alias, target in names.snap.aliases.items():
            if allowed is not None and target not in allowed:
                continue
            data.append({"id": alias, "object": "model", "created": 0, "owned_by": "ssw", "ssw": {"alias_of": target}})
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    async def documented_only(request: Request) -> Response:
        # GatewayApp serves these paths; the route is here for the OpenAPI document.
        return Response(status_code=405)

    for path, schema in REQUEST_SCHEMAS.items():
        app.add_api_route(path, documented_only, methods=["POST"], openapi_extra=_openapi(schema))

    return GatewayApp(gw, app)


def metrics_endpoint(gw: Gateway) -> Any:
    async def metrics() -> Response:
        return Response(gw.metrics.render(), media_type=CONTENT_TYPE)

    return metrics


def metrics_app(gw: Gateway) -> FastAPI:
    """The gateway's Prometheus endpoint on its own loopback listener."""
    app = FastAPI(title="ssw gateway metrics", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_api_route("/metrics", metrics_endpoint(gw), methods=["GET"])
    return app


def pool_metrics_app(pool: GatewayPool) -> FastAPI:
    """The series of several gateway processes, added up, served by their parent."""
    registry = pool_registry(pool.metrics_dir)
    app = FastAPI(title="ssw gateway metrics", docs_url=None, redoc_url=None, openapi_url=None)

    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE)

    app.add_api_route("/metrics", metrics, methods=["GET"])
    return app
