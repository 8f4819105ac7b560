"""The gateway's request path: a request on a proxy route is admitted
(:meth:`ssw.gateway.admission.Admission.admit`: its caller, body and model), finds
ready workers (:mod:`ssw.gateway.availability`: this host's, another host's, or
held while its model loads) or a fallback, and is relayed to one
(:mod:`ssw.gateway.relay`); what it did is accounted for once it is answered
(:mod:`ssw.gateway.accounting`). The gateway never starts units itself: loads
are asked of the loader. The ASGI entry and FastAPI's routes are in
:mod:`ssw.gateway.app`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import Iterable
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from ssw.common import redis_sink
from ssw.common.auth import ApiKey, KeyRing
from ssw.common.contract import Snapshot, WorkerView
from ssw.common.fleet_wire import fleet_redis
from ssw.common.routes import Body, Family, Route
from ssw.common.serving import Answer, AsyncAcceptor
from ssw.common.tracing import TRACEPARENT, Tracing
from ssw.config import MAX_DEADLINE_MS, Config
from ssw.errors import (
    BadRequest,
    DeadlineUnmet,
    LoaderUnavailable,
    LoadFailed,
    ModelLoading,
    NoCapacity,
    SswError,
    UpstreamError,
)
from ssw.gateway import hops, traces
from ssw.gateway.accounting import Accounting, Exchange
from ssw.gateway.admission import INTERNAL, PRIORITY_HEADER, Admission, Internal
from ssw.gateway.availability import MAX_HOSTS_TRIED, Availability, Deadline
from ssw.gateway.fleet import FleetUnavailable, FleetView, warn_if_insecure
from ssw.gateway.loader_client import LoaderClient
from ssw.gateway.metrics import GatewayMetrics
from ssw.gateway.names import Names, remote_host
from ssw.gateway.relay import Receive, Relay, Reply, Send, Unreached
from ssw.gateway.response_book import ResponseBook
from ssw.gateway.responses import StoredResponses
from ssw.gateway.waitqueue import VLLM_PRIORITY, WaitQueue

log = logging.getLogger(__name__)

WAIT_HEADER = b"x-ssw-wait"
DEADLINE_HEADER = b"x-ssw-deadline-ms"
FALLBACK_HEADER = b"x-ssw-fallback"
FALLBACK_FROM_HEADER = b"x-ssw-fallback-from"
ASYNC_HEADER = b"x-ssw-async"
EXCHANGE_SCOPE_KEY = "ssw.exchange"
FORWARD_HEADERS = (b"accept", b"x-request-id")
SOURCE = "ssw-gateway"
# Query parameters of a retrieve that reach the worker (re-encoded, never passed raw).
RETRIEVE_PARAMS = ("stream", "starting_after", "include[]")


class Gateway:
    def __init__(self, cfg: Config, loader: LoaderClient) -> None:
        self.cfg = cfg
        self.loader = loader
        self.metrics = GatewayMetrics()
        self.queue = WaitQueue(
            cfg.gateway.max_waiters_per_model,
            lambda model, priority, depth: self.metrics.waiting.labels(model, priority).set(depth),
        )
        loader.on_connection = lambda up: self.metrics.loader_connected.set(1 if up else 0)
        self.keys = KeyRing(cfg.auth.keys_file)
        self.keys.reload()
        # In a fleet: the other hosts, and where models load fleet-wide.
        self.fleet = FleetView(cfg.fleet, lambda: self.availability.on_fleet()) if cfg.fleet.enabled else None
        self.admission = Admission(cfg, self.keys, self.fleet)
        self.accounting = Accounting(cfg, self.metrics)
        self.tracing = Tracing(cfg.tracing, "ssw-gateway", cfg.fleet.host_name() if cfg.fleet.enabled else None)
        self.accounting.on_traced = lambda ex: traces.finish(self.tracing, ex)
        self._names: Names | None = None
        self.availability = Availability(cfg, loader, self.queue, self.metrics, lambda: self.names, self.fleet)
        # In a fleet, which host holds each stored response is the fleet's to know.
        book = ResponseBook(
            fleet_redis(cfg.fleet, timeout=0.5) if cfg.fleet.enabled else redis_sink.client(cfg.redis_url),
            cfg.gateway.responses_remember_s,
            cfg.gateway.responses_max,
        )
        self.stored = StoredResponses(cfg, book, self.admission, lambda: self.names, self.fleet)
        self.relay = Relay(cfg, loader.used, self.stored.note)
        loader.watch(self.relay.inflight)
        # Accepts a request sent with X-SSW-Async (the asynchronous tier, when it is on).
        self.on_async: AsyncAcceptor | None = None
        if self.fleet is not None:
            self.relay.pool.ssl_context = self.fleet.ssl_context()
            warn_if_insecure(cfg.fleet)
            self.metrics.host = self.fleet.host

    async def close(self) -> None:
        if self.fleet is not None:
            await self.fleet.close()
        await self.relay.pool.close()
        await self.stored.book.close()
        await asyncio.to_thread(self.tracing.close)

    @property
    def names(self) -> Names:
        snap = self.loader.snapshot
        if snap is None:
            raise LoaderUnavailable("the gateway has not reached the loader yet; retry shortly")
        fleet_version = self.fleet.version if self.fleet else 0
        if self._names is None or self._names.snap is not snap or self._names.fleet_version != fleet_version:
            self._names = Names(snap, self.fleet)
        return self._names

    def in_flight(self) -> int:
        return self.relay.in_flight()

    # --- what the batch tier asks (ssw.common.serving.Serving) -----------------------------

    @property
    def metrics_registry(self) -> CollectorRegistry:
        return self.metrics.registry

    @property
    def snapshot(self) -> Snapshot | None:
        return self.loader.snapshot

    def authenticate(self, headers: Iterable[tuple[bytes, bytes]]) -> ApiKey | None:
        return self.admission.authenticate(headers)

    def key_named(self, name: str) -> ApiKey | None:
        return self.keys.named(name)

    def admit_line(self, key: ApiKey | None, route: Route, body: dict[str, Any]) -> str:
        return self.admission.check(key, body, route, self.names)

    def interactive_queued(self, model: str) -> int:
        return self.queue.depth(model)

    async def request_load(self, model: str, protect_s: float) -> None:
        await self.loader.request_load(model, protect_s=protect_s, priority="batch")

    # --- the proxy routes --------------------------------------------------------------------

    def _deadline(self, headers: dict[bytes, bytes], ex: Exchange) -> Deadline | None:
        """How long this request may wait for its first token while its model is not ready:
        X-SSW-Deadline-Ms, else its priority's gateway.deadlines_ms; counted from its arrival."""
        raw = headers.get(DEADLINE_HEADER)
        if raw is not None:
            text = raw.decode("latin-1").strip()
            if not text.isdigit() or not 1 <= int(text) <= MAX_DEADLINE_MS:
                raise BadRequest(
                    f"X-SSW-Deadline-Ms must be a whole number of milliseconds from 1 to {MAX_DEADLINE_MS}"
                )
            ms: int | None = int(text)
        else:
            ms = self.cfg.gateway.deadlines_ms.get(ex.priority)  # type: ignore[call-overload]
        if ms is None:
            return None
        return Deadline.after(ms - int((time.perf_counter() - ex.t0) * 1000))

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
        route: Route,
        mode: str,
        ex: Exchange,
        fallback: bool | None,
        reply: Reply,
        stream: bool,
        hop: bool = False,
        deadline: Deadline | None = None,
    ) -> tuple[str, list[WorkerView], str | None]:
        """(model that serves, its workers, the model it stands in for or None)."""
        try:
            key_name = key.name if key else ""
            ready = await self.availability.workers_for(
                model, mode, ex.priority, reply, stream, hop, key_name, deadline, ex.traceparent
            )
            return model, ready, None
        except (LoadFailed, NoCapacity, FleetUnavailable, DeadlineUnmet) as exc:
            names = self.names
            entry = names.models.get(model)
            # A deadline asks for an answer in time: a ready fallback gives one, unless the
            # request said X-SSW-Fallback: false.
            default = isinstance(exc, DeadlineUnmet) or bool(entry and entry.fallback_default)
            allowed = fallback if fallback is not None else default
            if entry is None or not allowed or not route.fallbacks:
                raise
            in_scope = self.admission.allowed_models(key, names.expand)
            for candidate in entry.fallbacks:
                candidate_entry = names.models.get(candidate)
                workers = names.ready.get(candidate) or (None if hop else names.remote.get(candidate))
                if candidate_entry is None or not workers or route.family not in candidate_entry.capabilities:
                    continue
                if in_scope is not None and candidate not in in_scope:
                    continue  # a fallback never widens what the key may use
                try:
                    self.admission.validate(body, route, candidate_entry.max_tokens)
                except BadRequest:
                    continue  # nor the limits the fallback has
                log.info("%s cannot serve (%s); falling back to %s", model, exc.message, candidate)
                return candidate, workers, model
            raise

    async def proxy(
        self, scope: dict[str, Any], receive: Receive, send: Send, route: Route, response_id: str | None
    ) -> None:
        ex = Exchange(route=route.path)
        traces.begin(self.tracing, scope, route, ex)
        # A front end that translates another API (Ollama's) reads what the request did here.
        scope[EXCHANGE_SCOPE_KEY] = ex
        reply = Reply(send, receive)
        reply.dialect = route.dialect
        try:
            if route.body is Body.NONE:
                await self._by_response(scope, receive, reply, ex, route, response_id or "")
            else:
                await self._proxy(scope, receive, reply, ex, route)
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

    async def execute(self, key: ApiKey | None, route: Route, body: bytes, priority: str = "batch") -> Answer:
        """Run one request on behalf of ``key`` exactly as the public route would (the
        same admission rules, fallbacks, relay and accounting), and return its whole
        answer. A model that is not ready is a 503, never a wait or a load."""
        answer = Answer()
        scope = {
            "type": "http",
            "method": "POST",
            "path": route.path,
            "query_string": b"",
            "headers": [(b"content-length", b"%d" % len(body)), (PRIORITY_HEADER, priority.encode())],
            INTERNAL: Internal(key),
        }
        sent = False
        parts: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Future()  # no disconnect: the runner waits for the whole answer
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer.status = message["status"]
                answer.headers = list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))

        await self.proxy(scope, receive, send, route, None)
        answer.body = b"".join(parts)
        return answer

    def _hop_head(
        self,
        worker: WorkerView,
        method: bytes,
        target: bytes,
        payload: bytes,
        headers: dict[bytes, bytes],
        content_type: bytes,
        ex: Exchange,
        wait: bool,
    ) -> bytes:
        """The head of a request to ``worker``: a local worker's, or another host's gateway's
        with the claim that carries the client's key name, priority, wait and fallback."""
        extra: list[tuple[bytes, bytes]] = [(TRACEPARENT, ex.traceparent)] if ex.traceparent else []
        host = remote_host(worker)
        if host is not None and self.fleet is not None:
            fallback = _truthy(headers.get(FALLBACK_HEADER))
            claim = self.fleet.claim(
                host, ex.key, ex.priority, wait, fallback, method.decode(), target.decode("latin-1"), payload
            )
            extra.append((hops.HEADER, claim))
        return _request_head(method, target, payload, headers, content_type, extra)

    async def _proxy(self, scope: dict[str, Any], receive: Receive, reply: Reply, ex: Exchange, route: Route) -> None:
        got = await self.admission.admit(scope, receive, ex, route, lambda: self.names)
        ex.admitted_at = time.perf_counter()
        key, headers, raw, body, form, claim = got.key, got.headers, got.raw, got.body, got.form, got.claim
        model, asked, stream, multipart = got.model, got.asked, got.stream, form is not None
        if self.on_async is not None and not got.internal and _truthy(headers.get(ASYNC_HEADER)):
            if multipart or stream:
                raise BadRequest("X-SSW-Async takes a JSON request that does not stream")
            await reply.whole(*await self.on_async(key, route, model, raw))
            ex.status = 202
            return
        previous = body.get("previous_response_id") if route.family is Family.RESPONSES else None
        ex.capture_id = route.path == "/v1/responses" and body.get("store") is not False
        if previous is not None:
            # Continuing a stored response: only the worker that holds it can (on this host,
            # or through the gateway of the host that holds it).
            holder = await self.stored.holder(previous, key)
            if holder.model != model:
                raise BadRequest(f"previous_response_id belongs to model '{holder.model}', not '{model}'")
            worker = self.stored.holding_worker(holder, previous)
            payload = self._payload(body, raw, route, model, ex, asked)
            head = self._hop_head(worker, b"POST", route.path.encode(), payload, headers, b"application/json", ex, True)
            await self.relay.forward(model, head, payload, [worker], ex, reply, receive)
            return
        sdk = any(name.startswith(b"x-stainless-") for name in headers)
        # Work ssw runs itself is never held: the runner decides when a model is worth a load.
        if got.internal:
            mode = "batch"
        elif claim is not None:
            mode = "wait" if claim.wait else "unavailable"
        else:
            mode = self.not_loaded_mode(key, _truthy(headers.get(WAIT_HEADER)), sdk)
        # A hop never falls back on the far side: the first host applied the key's fallbacks.
        fallback = False if claim is not None else _truthy(headers.get(FALLBACK_HEADER))
        deadline = None if got.internal or claim is not None else self._deadline(headers, ex)
        # Each host that cannot be reached is passed over, then the next, then a load here.
        for _ in range(MAX_HOSTS_TRIED):
            asked_at = time.perf_counter()
            try:
                served, workers, stands_in_for = await self._serve_or_fallback(
                    key, model, body, route, mode, ex, fallback, reply, stream, claim is not None, deadline
                )
                ex.waited_s += time.perf_counter() - asked_at
                ex.wait_from = asked_at if ex.wait_from is None else ex.wait_from
                ex.load_marks = workers[0].load_marks
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
            if form is not None:
                # The form goes through as sent, with the model's own name for an alias.
                payload = raw if asked == served else form.with_value("model", served)
                content_type = headers.get(b"content-type", b"")
            else:
                payload = self._payload(body, raw, route, served, ex, asked)
                content_type = b"application/json"
            host = remote_host(workers[0])
            if host is not None:
                workers = self.relay.order(served, workers)[:1]  # the claim is for one host
            head = self._hop_head(workers[0], b"POST", route.path.encode(), payload, headers, content_type, ex,
                                  mode == "wait")  # fmt: skip
            if stands_in_for is not None and not reply.started:
                reply.extra_headers.append((FALLBACK_FROM_HEADER, stands_in_for.encode()))
            try:
                await self.relay.forward(served, head, payload, workers, ex, reply, receive, remote=host is not None)
                return
            except Unreached as exc:
                if host is None or self.fleet is None:
                    raise
                self.fleet.unreachable(host, exc.message)
        raise UpstreamError(f"no host of the fleet that has '{model}' could be reached")

    async def _by_response(
        self, scope: dict[str, Any], receive: Receive, reply: Reply, ex: Exchange, route: Route, response_id: str
    ) -> None:
        """Retrieve or cancel a stored response: at the worker that holds it (through its
        host's gateway, in a fleet), or a 404."""
        got = await self.admission.admit(scope, receive, ex, route, lambda: self.names)  # no body is expected
        holder = await self.stored.holder(response_id, got.key)
        worker = self.stored.holding_worker(holder, response_id)
        ex.model = holder.model
        path = scope["path"].encode()  # its id matched RESPONSE_ID
        if route.method == "GET":
            query = urllib.parse.parse_qsl(scope.get("query_string", b"").decode("latin-1"))
            kept = [(k, v) for k, v in query if k in RETRIEVE_PARAMS]
            ex.stream = any(k == "stream" and v.lower() == "true" for k, v in kept)
            if kept:
                path += b"?" + urllib.parse.urlencode(kept).encode()
        head = self._hop_head(worker, route.method.encode(), path, b"", got.headers, b"application/json", ex, False)
        await self.relay.forward(
            holder.model, head, b"", [worker], ex, reply, receive, remote=remote_host(worker) is not None
        )

    def _payload(
        self, body: dict[str, Any], raw: bytes, route: Route, served: str, ex: Exchange, asked: object
    ) -> bytes:
        """The body the worker gets: the client's bytes unless ssw had to change something."""
        changed = asked != served
        body["model"] = served
        if ex.stream and route.usage_chunk:
            options = body.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage")):
                # Token counts come from vLLM's usage chunk; the client did not
                # ask for it, so it is taken out of their stream again.
                body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
                ex.strip_usage = changed = True
        # (a model only another host of the fleet has is in the fleet's names, not this snapshot)
        entry = self.names.models[served]
        if route.family is Family.CHAT and entry.chat_template_kwargs:
            kwargs = body.get("chat_template_kwargs")
            kwargs = dict(kwargs) if isinstance(kwargs, dict) else {}
            for name, value in entry.chat_template_kwargs.items():
                if name not in kwargs:
                    kwargs[name] = value
                    changed = True
            body["chat_template_kwargs"] = kwargs
        if entry.scheduling_policy == "priority" and route.takes_priority and "priority" not in body:
            body["priority"] = VLLM_PRIORITY[ex.priority]
            changed = True
        return orjson.dumps(body) if changed else raw


def _truthy(value: bytes | None) -> bool | None:
    if value is None:
        return None
    return value.strip().lower() in (b"1", b"true", b"yes")


def _request_head(
    method: bytes,
    path: bytes,
    payload: bytes,
    headers: dict[bytes, bytes],
    content_type: bytes,
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> bytes:
    lines = [
        method + b" " + path + b" HTTP/1.1",
        b"host: localhost",
        b"content-type: " + content_type,
        b"content-length: %d" % len(payload),
    ]
    for name in FORWARD_HEADERS:
        value = headers.get(name)
        if value is not None:
            lines.append(name + b": " + value)
    lines += [name + b": " + value for name, value in extra]
    return b"\r\n".join(lines) + b"\r\n\r\n"
