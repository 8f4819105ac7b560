"""The gateway role: the OpenAI-compatible API on the public port.

It resolves names and aliases against the loader's pushed snapshot, holds or
answers 202 for models that are not loaded, and proxies to a worker, streaming
chunk by chunk. It never starts units itself: loads are asked of the loader.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from . import __version__, http_errors
from .auth import ApiKey, Forbidden, KeyRing
from .config import Config
from .errors import (
    BadRequest,
    HeadersTooLarge,
    LoaderUnavailable,
    LoadFailed,
    ModelLoading,
    ModelNotFound,
    NoCapacity,
    PayloadTooLarge,
    RequestTimeout,
    SswError,
    TooManyRequests,
    UpstreamError,
)
from .loader_client import LoaderClient
from .prom import CONTENT_TYPE, GatewayMetrics
from .redis_sink import RedisSink, RequestRecord
from .registry import valid_name
from .routing import RoundRobin, least_outstanding
from .waitqueue import VLLM_PRIORITY, WaitQueue, parse_priority

log = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER_S = 60  # when a model has never loaded here
MAX_FAILOVER_ATTEMPTS = 3
SUSPECT_FOR_S = 5.0  # a worker that refused a connection is skipped this long
WAIT_HEADER = "x-ssw-wait"
PRIORITY_HEADER = "x-ssw-priority"
FALLBACK_HEADER = "x-ssw-fallback"
FALLBACK_FROM_HEADER = "X-SSW-Fallback-From"
_FORWARD_HEADERS = ("content-type", "accept", "x-request-id")
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


@dataclass
class Exchange:
    """What one request did, for metrics, Redis and the access log."""

    started: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.perf_counter)
    model: str = "unknown"  # never client text: unknown names stay "unknown"
    priority: str = "interactive"
    stream: bool = False
    worker: str = ""
    status: int = 0
    error: str = ""
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    strip_usage: bool = False  # ssw asked vLLM for the usage chunk, the client did not
    key: str = ""  # the API key's name
    admitted: bool = False  # counted against its key's in-flight limit

    def usage(self, usage: object) -> None:
        if isinstance(usage, dict):
            p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
            self.prompt_tokens = p if isinstance(p, int) else None
            self.completion_tokens = c if isinstance(c, int) else None


def _truthy(value: str | None) -> bool | None:
    if value is None:
        return None
    return value.strip().lower() in ("1", "true", "yes")


class Gateway:
    def __init__(self, cfg: Config, loader: LoaderClient, session: aiohttp.ClientSession) -> None:
        self.cfg = cfg
        self.loader = loader
        self.session = session
        self.rr = RoundRobin()
        self.queue = WaitQueue(cfg.gateway.max_waiters_per_model)
        self.outstanding: dict[str, int] = {}  # worker url -> requests in flight
        self._suspect_until: dict[str, float] = {}
        self._wait_seq: dict[str, int] = {}  # model -> snapshot seq that reflects its load request
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=cfg.gateway.upstream_connect_timeout_s,
            sock_read=cfg.gateway.upstream_read_timeout_s,
        )
        loader.on_snapshot(self._on_snapshot)
        self.metrics = GatewayMetrics(lambda: {m: self.queue.depth(m) for m in self.queue.models()})
        self.sink = RedisSink(cfg.redis_url, capacity=cfg.gateway.metrics_buffer)
        self.sink.on_drop = lambda n: self.metrics.dropped.inc(n)
        self.keys = KeyRing(cfg.auth.keys_file)
        self.keys.reload()
        self.key_in_flight: dict[str, int] = {}

    # --- who may call ------------------------------------------------------------------

    def authenticate(self, request: Request) -> ApiKey | None:
        """The caller's key (None when auth is off); 401 for a missing or wrong key."""
        raw_size = sum(len(k) + len(v) for k, v in request.headers.raw)
        if raw_size > self.cfg.limits.max_header_bytes:
            raise HeadersTooLarge(f"request headers exceed {self.cfg.limits.max_header_bytes} bytes")
        if not self.cfg.auth.enabled:
            return None
        return self.keys.check(request.headers.get("authorization"))

    def check_scope(self, key: ApiKey | None, name: object) -> None:
        """403 for a model outside the key's scope, whether or not that model exists."""
        if key is None or key.models is None:
            return
        if isinstance(name, str) and name in key.models:
            return
        try:
            target = self.resolve(name)
        except (ModelNotFound, BadRequest):
            target = None
        if target is not None:
            allowed = set()
            for entry in key.models:
                with contextlib.suppress(ModelNotFound, BadRequest):
                    allowed.add(self.resolve(entry))
            if target in allowed:
                return
        raise Forbidden("This API key may not use that model.")

    def allowed_models(self, key: ApiKey | None) -> set[str] | None:
        if key is None or key.models is None:
            return None
        out = set()
        for entry in key.models:
            with contextlib.suppress(ModelNotFound, BadRequest):
                out.add(self.resolve(entry))
        return out

    def admit(self, key: ApiKey | None, ex: Exchange) -> None:
        if key is None:
            return
        limit = min(key.max_in_flight or self.cfg.limits.max_in_flight_per_key, self.cfg.limits.max_in_flight_per_key)
        if self.key_in_flight.get(key.name, 0) >= limit:
            raise TooManyRequests(f"this API key already has {limit} requests in flight")
        self.key_in_flight[key.name] = self.key_in_flight.get(key.name, 0) + 1
        ex.admitted = True

    async def read_body(self, request: Request) -> bytes:
        limit = self.cfg.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
        chunks: list[bytes] = []
        size = 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.cfg.limits.body_timeout_s)
        except TimeoutError:
            raise RequestTimeout(
                f"the request body did not arrive within {self.cfg.limits.body_timeout_s:.0f} s"
            ) from None
        return b"".join(chunks)

    def validate(self, body: dict[str, Any], path: str, model: str) -> None:
        """The fields ssw relies on, checked before any worker is touched; the rest
        passes through to vLLM untouched."""
        if "stream" in body and not isinstance(body["stream"], bool):
            raise BadRequest("'stream' must be a boolean")
        if path == "/v1/chat/completions":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise BadRequest("'messages' must be a non-empty array")
            if len(messages) > self.cfg.limits.max_messages:
                raise BadRequest(f"at most {self.cfg.limits.max_messages} messages per request")
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
                    raise BadRequest(f"messages[{i}]: an object whose 'role' is one of {', '.join(CHAT_ROLES)}")
        elif path == "/v1/completions" and not isinstance(body.get("prompt"), str | list):
            raise BadRequest("'prompt' must be a string or an array")
        elif path == "/v1/embeddings" and not isinstance(body.get("input"), str | list):
            raise BadRequest("'input' must be a string or an array")
        ceiling = self._snapshot()["models"].get(model, {}).get("max_tokens")
        for field_name in ("max_tokens", "max_completion_tokens"):
            value = body.get(field_name)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BadRequest(f"'{field_name}' must be a positive integer")
            if ceiling and value > ceiling:
                raise BadRequest(f"'{field_name}' may be at most {ceiling} for this model")

    def in_flight(self) -> int:
        return sum(self.outstanding.values())

    def finish(self, ex: Exchange) -> None:
        """Account for one answered request; never raises, never blocks."""
        latency = time.perf_counter() - ex.t0
        m = self.metrics
        m.requests.labels(ex.model, str(ex.status)).inc()
        m.duration.labels(ex.model).observe(latency)
        if ex.ttft_s is not None:
            m.ttft.labels(ex.model).observe(ex.ttft_s)
        if ex.prompt_tokens:
            m.prompt_tokens.labels(ex.model).inc(ex.prompt_tokens)
        if ex.completion_tokens:
            m.completion_tokens.labels(ex.model).inc(ex.completion_tokens)
        ttft_ms = None if ex.ttft_s is None else round(ex.ttft_s * 1000, 2)
        self.sink.record(
            RequestRecord(
                ts=ex.started,
                model=ex.model,
                worker=ex.worker,
                priority=ex.priority,
                status=ex.status,
                latency_ms=round(latency * 1000, 2),
                ttft_ms=ttft_ms,
                prompt_tokens=ex.prompt_tokens,
                completion_tokens=ex.completion_tokens,
                error=ex.error,
                stream=ex.stream,
                key=ex.key,
            )
        )
        if ex.admitted:
            self.key_in_flight[ex.key] -= 1
        if self.cfg.gateway.access_log:
            log.info(
                "request key=%s model=%s worker=%s status=%d latency_ms=%.1f ttft_ms=%s prompt_tokens=%s "
                "completion_tokens=%s priority=%s stream=%s error=%s",
                ex.key or "-",
                ex.model,
                ex.worker or "-",
                ex.status,
                latency * 1000,
                ttft_ms,
                ex.prompt_tokens,
                ex.completion_tokens,
                ex.priority,
                ex.stream,
                ex.error or "-",
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

    def retry_after(self, model: str) -> int:
        """An honest wait: the model's measured load time less what has passed."""
        entry = self._snapshot()["models"].get(model, {})
        load_s = entry.get("load_seconds")
        if not load_s:
            return DEFAULT_RETRY_AFTER_S
        since = entry.get("loading_since")
        elapsed = time.time() - since if since else 0.0
        return max(1, math.ceil(load_s - elapsed))

    # --- loading -----------------------------------------------------------------------

    def _on_snapshot(self) -> None:
        """Release or fail waiters as soon as the loader's news arrives."""
        snap = self.loader.snapshot
        if snap is None:
            return
        for model in self.queue.models():
            if self.ready_workers(model):
                released = self.queue.release(model)
                log.info("%s: ready; released %d waiting requests", model, len(released))
                continue
            if snap["seq"] < self._wait_seq.get(model, 0):
                continue  # this snapshot predates the load request
            entry = snap["models"].get(model)
            starting = any(w["model"] == model for w in snap["workers"])
            if entry is None or (not entry.get("loading") and not starting):
                reason = (entry or {}).get("last_error") or "no worker came up"
                self.queue.fail(model, LoadFailed(f"loading '{model}' failed: {reason}", self.retry_after(model)))

    async def workers_for(self, model: str, wait: bool, priority: str) -> list[dict[str, Any]]:
        workers = self.ready_workers(model)
        if workers:
            return workers
        seq = await self.loader.request_load(model)
        retry = self.retry_after(model)
        if not wait:
            raise ModelLoading(f"model '{model}' is loading", retry)
        self._wait_seq[model] = max(self._wait_seq.get(model, 0), seq)
        waiter = self.queue.add(model, priority, retry)
        self._on_snapshot()  # it may have become ready meanwhile
        try:
            await asyncio.wait_for(waiter.future, self.cfg.gateway.wait_timeout_s)
        except TimeoutError:
            self.queue.discard(waiter)
            raise ModelLoading(
                f"model '{model}' did not become ready within {self.cfg.gateway.wait_timeout_s:.0f} s",
                self.retry_after(model),
            ) from None
        workers = self.ready_workers(model)
        if not workers:
            raise UpstreamError(f"model '{model}' was ready but its worker is gone again; retry")
        return workers

    async def _serve_or_fallback(
        self, model: str, wait: bool, priority: str, fallback: bool | None
    ) -> tuple[str, list[dict[str, Any]], str | None]:
        """(model that serves, its workers, the model it stands in for or None)."""
        try:
            return model, await self.workers_for(model, wait, priority), None
        except (LoadFailed, NoCapacity) as exc:
            entry = self._snapshot()["models"].get(model, {})
            allowed = fallback if fallback is not None else bool(entry.get("fallback_default"))
            if not allowed:
                raise
            for candidate in entry.get("fallbacks", []):
                if candidate in self._snapshot()["models"]:
                    workers = self.ready_workers(candidate)
                    if workers:
                        log.info("%s cannot serve (%s); falling back to %s", model, exc.message, candidate)
                        return candidate, workers, model
            raise

    # --- proxying ----------------------------------------------------------------------

    async def forward(self, request: Request, path: str) -> Response:
        ex = Exchange()
        try:
            key = self.authenticate(request)
            ex.key = key.name if key else ""
            self.admit(key, ex)
            response = await self._forward(request, path, ex, key)
        except SswError as exc:
            ex.status, ex.error = exc.status, exc.code or exc.type
            self.finish(ex)
            raise
        except Exception:
            ex.status, ex.error = 500, "internal_error"
            self.finish(ex)
            raise
        if not isinstance(response, _Stream):
            self.finish(ex)  # a stream is accounted for when it ends
        return response

    async def _forward(self, request: Request, path: str, ex: Exchange, key: ApiKey | None) -> Response:
        raw = await self.read_body(request)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        if "model" not in body:
            raise BadRequest("'model' is required")
        ex.stream = body.get("stream") is True
        priority = parse_priority(request.headers.get(PRIORITY_HEADER))
        ex.priority = priority
        self.check_scope(key, body["model"])
        model = self.resolve(body["model"])
        ex.model = model
        self.validate(body, path, model)
        wait = bool(_truthy(request.headers.get(WAIT_HEADER)))
        try:
            served, workers, stands_in_for = await self._serve_or_fallback(
                model, wait, priority, _truthy(request.headers.get(FALLBACK_HEADER))
            )
        except ModelLoading as exc:
            if wait:
                raise
            ex.status = 202
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

        ex.model = served
        changed = body["model"] != served
        body["model"] = served
        if ex.stream and path != "/v1/embeddings":
            options = body.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage")):
                # Token counts come from vLLM's usage chunk; the client did not
                # ask for it, so it is taken out of their stream again.
                body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
                ex.strip_usage = changed = True
        entry = self._snapshot()["models"][served]
        if path == "/v1/chat/completions":
            defaults = entry.get("chat_template_kwargs") or {}
            if defaults:
                kwargs = body.get("chat_template_kwargs")
                kwargs = dict(kwargs) if isinstance(kwargs, dict) else {}
                for key, value in defaults.items():
                    if key not in kwargs:
                        kwargs[key] = value
                        changed = True
                body["chat_template_kwargs"] = kwargs
        if entry.get("scheduling_policy") == "priority" and "priority" not in body:
            body["priority"] = VLLM_PRIORITY[priority]
            changed = True
        payload = json.dumps(body).encode() if changed else raw
        headers = {k: v for k in _FORWARD_HEADERS if (v := request.headers.get(k)) is not None}
        response = await self._send(served, path, payload, headers, workers, ex)
        if stands_in_for is not None:
            response.headers[FALLBACK_FROM_HEADER] = stands_in_for
        return response

    def _order(self, model: str, workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.cfg.gateway.routing == "least_outstanding":
            return least_outstanding(workers, lambda w: self.outstanding.get(w["url"], 0), self.rr, model)
        return self.rr.order(model, workers)

    async def _send(
        self,
        model: str,
        path: str,
        payload: bytes,
        headers: dict[str, str],
        workers: list[dict[str, Any]],
        ex: Exchange,
    ) -> Response:
        last_error: Exception | None = None
        order = self._order(model, workers)
        # Cycle through the pool: a lone worker gets another try too, on a fresh
        # connection (a pooled one may point at a process that was replaced).
        for attempt in range(MAX_FAILOVER_ATTEMPTS):
            worker = order[attempt % len(order)]
            url = worker["url"]
            self.outstanding[url] = self.outstanding.get(url, 0) + 1
            try:
                resp = await self.session.post(url + path, data=payload, headers=headers, timeout=self._timeout)
            except _CONNECT_ERRORS as exc:
                self.outstanding[url] -= 1
                # Nothing has reached the client yet, so the next worker may serve it.
                log.warning("%s: connection failed (%s); trying the next worker", worker["unit"], exc)
                self._suspect_until[url] = time.monotonic() + SUSPECT_FOR_S
                last_error = exc
                continue
            except BaseException:
                self.outstanding[url] -= 1
                raise
            self.loader.used(worker["unit"])
            ex.worker = worker["unit"]
            return await self._relay(resp, url, ex)
        raise UpstreamError(f"no worker of '{model}' could be reached: {last_error}")

    async def _relay(self, resp: aiohttp.ClientResponse, url: str, ex: Exchange) -> Response:
        ex.status = resp.status
        ctype = resp.headers.get("Content-Type", "application/json")
        if ctype.startswith("text/event-stream"):
            done = {"closed": False}

            def close(finished: bool) -> None:
                # Once, from whichever comes first: the end of the stream, or
                # the response being torn down before the stream even began.
                if done["closed"]:
                    return
                done["closed"] = True
                self.outstanding[url] -= 1
                if not finished:
                    ex.error = ex.error or "client_disconnected"
                # A client that left mid-stream: closing the connection makes
                # vLLM abort the request instead of generating for nobody.
                if finished:
                    resp.release()
                else:
                    resp.close()
                self.finish(ex)

            return _Stream(
                self._events(resp, ex, close),
                close,
                status_code=resp.status,
                media_type=None,
                headers={"Content-Type": ctype, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            data = await resp.read()
        finally:
            self.outstanding[url] -= 1
            resp.release()
        if resp.status == 200 and ctype.startswith("application/json"):
            with contextlib.suppress(ValueError, AttributeError):
                ex.usage(json.loads(data).get("usage"))
        elif resp.status >= 400:
            ex.error = "upstream_" + str(resp.status)
        return Response(data, status_code=resp.status, headers={"Content-Type": ctype})

    async def _events(
        self, resp: aiohttp.ClientResponse, ex: Exchange, close: Callable[[bool], None]
    ) -> AsyncIterator[bytes]:
        """Relay server-sent events as they arrive, noting the first token and the
        usage chunk (and dropping that chunk when only ssw asked for it)."""
        finished = False
        pending = b""
        try:
            async for chunk in resp.content.iter_any():
                pending += chunk
                cut = pending.rfind(b"\n\n")
                if cut < 0:
                    continue
                complete, pending = pending[: cut + 2], pending[cut + 2 :]
                out = self._inspect(complete, ex)
                if out:
                    yield out
            if pending:
                yield pending
            finished = True
        finally:
            close(finished)

    @staticmethod
    def _inspect(events: bytes, ex: Exchange) -> bytes:
        if ex.ttft_s is not None and b'"usage"' not in events:
            return events  # the common case: nothing to look at
        kept = []
        for event in events.split(b"\n\n"):
            if not event:
                continue
            drop = False
            if event.startswith(b"data: {"):
                try:
                    obj = json.loads(event[6:])
                except ValueError:
                    obj = None
                if isinstance(obj, dict):
                    if ex.ttft_s is None and _has_token(obj):
                        ex.ttft_s = time.perf_counter() - ex.t0
                    if obj.get("usage") and not obj.get("choices"):
                        ex.usage(obj["usage"])
                        drop = ex.strip_usage
            if not drop:
                kept.append(event + b"\n\n")
        return b"".join(kept)


class _Stream(StreamingResponse):
    """A streamed relay whose upstream is closed even if the client leaves before
    the first byte (then the body iterator never runs its own cleanup)."""

    def __init__(self, body: AsyncIterator[bytes], close: Callable[[bool], None], **kwargs: Any) -> None:
        super().__init__(body, **kwargs)
        self._close = close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._close(False)  # a no-op after a stream that ended on its own


def _has_token(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        if isinstance(choice, dict):
            raw_delta = choice.get("delta")
            delta: dict[str, Any] = raw_delta if isinstance(raw_delta, dict) else {}
            if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls") or choice.get("text"):
                return True
    return False


# The request bodies ssw reads; every other field passes through to vLLM, so
# the schemas allow additional properties. Published at /openapi.json.
_MODEL = {"type": "string", "description": "A model name or alias."}
_MAX_TOKENS = {"type": "integer", "minimum": 1}
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
            "202": {"description": "The model is loading; retry after Retry-After seconds."},
            **{code: _ERROR for code in ("400", "401", "403", "404", "408", "413", "422", "429", "431", "503")},
        },
    }


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
            "waiting": {m: gw.queue.depth(m) for m in gw.queue.models()},
            "requests_in_flight": gw.in_flight(),
        }

    if gw.cfg.gateway.public_metrics:
        app.add_api_route("/metrics", metrics_endpoint(gw), methods=["GET"], include_in_schema=False)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        key = gw.authenticate(request)
        snap = gw._snapshot()
        allowed = gw.allowed_models(key)
        data = []
        for name, entry in snap["models"].items():
            if allowed is not None and name not in allowed:
                continue
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
            if allowed is not None and target not in allowed:
                continue
            data.append({"id": alias, "object": "model", "created": 0, "owned_by": "ssw", "ssw": {"alias_of": target}})
        return {"object": "list", "data": data}

    async def proxy(request: Request) -> Response:
        return await gw.forward(request, request.url.path)

    for path, schema in REQUEST_SCHEMAS.items():
        app.add_api_route(path, proxy, methods=["POST"], openapi_extra=_openapi(schema))

    return app


def metrics_endpoint(gw: Gateway) -> Any:
    async def metrics() -> Response:
        return Response(gw.metrics.render(), media_type=CONTENT_TYPE)

    return metrics


def metrics_app(gw: Gateway) -> FastAPI:
    """The gateway's Prometheus endpoint on its own loopback listener."""
    app = FastAPI(title="ssw gateway metrics", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_api_route("/metrics", metrics_endpoint(gw), methods=["GET"])
    return app
