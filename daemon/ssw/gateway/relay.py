"""The hot path: one request to a worker over its unix socket and its answer
back to the client, relayed as it arrives, written straight to ASGI.

Workers are tried in routing order; a request that gets no byte of an answer
(refused, missing socket, full backlog, or the worker died or closed the
connection before answering) moves on to the next one. Once any byte of an
answer came back nothing is retried. Streams are
relayed event by event (the time to the first token is noted, and the usage
chunk ssw asked for on the client's behalf is taken out again); a client that
leaves closes the upstream connection, which makes vLLM abort the request.
Errors a worker answers with are wrapped in the OpenAI envelope with
``source: worker``, status and message kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from ssw.common.contract import WorkerView
from ssw.common.routes import Dialect
from ssw.common.upstream import ConnectFailed, Limits, NoAnswer, Pool, Response, ResponseFailed
from ssw.config import Config
from ssw.errors import SswError, UpstreamError
from ssw.gateway.accounting import Exchange
from ssw.gateway.inflight import InFlight
from ssw.gateway.routing import RoundRobin, least_outstanding

log = logging.getLogger(__name__)

MAX_FAILOVER_ATTEMPTS = 3
SUSPECT_FOR_S = 5.0  # a worker whose socket refused a connection is skipped this long
JSON = b"application/json"
SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]

Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]


# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors); its
# SDKs retry 408, 409, 429 and 5xx, honouring Retry-After.
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_error(status: int, message: str, source: str, type_: str | None = None) -> bytes:
    kind = type_ if type_ in ANTHROPIC_ERROR_TYPES.values() else ANTHROPIC_ERROR_TYPES.get(status, "api_error")
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message, "source": source}})


def envelope(exc: SswError, source: str, dialect: Dialect = Dialect.OPENAI) -> bytes:
    if dialect is Dialect.ANTHROPIC:
        return anthropic_error(exc.status, exc.message, source)
    return orjson.dumps(
        {"error": {"message": exc.message, "type": exc.type, "param": None, "code": exc.code, "source": source}}
    )


class Reply:
    """The answer to one client over ASGI. It starts at most once; a held stream
    that already sent keep-alives can only go on as server-sent events."""

    __slots__ = ("_receive", "_send", "dialect", "ended", "extra_headers", "sse", "started", "status")

    def __init__(self, send: Send, receive: Receive | None = None) -> None:
        self._send = send
        self._receive = receive
        self.dialect = Dialect.OPENAI  # the shape its errors take
        self.started = False
        self.sse = False
        self.ended = False
        self.status = 0
        self.extra_headers: list[tuple[bytes, bytes]] = []  # added to whatever response starts

    async def client_left(self) -> None:
        """Returns once the client has gone (call it only once its body was read)."""
        if self._receive is None:
            await asyncio.Future()  # a request ssw makes itself: its caller never leaves
        else:
            await _disconnected(self._receive)

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        self.status = status
        if self.extra_headers:
            headers = [*headers, *self.extra_headers]
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def start_sse(self) -> None:
        self.sse = True
        await self.start(200, SSE_HEADERS)

    async def body(self, data: bytes, more: bool = True) -> None:
        if not more:
            self.ended = True
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def end(self) -> None:
        if not self.ended:
            await self.body(b"", more=False)

    async def whole(self, status: int, data: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """A complete JSON answer, or on a started stream the same as one event."""
        if self.sse:
            await self.body(b"data: " + data + b"\n\n", more=False)
            return
        await self.start(status, [(b"content-type", JSON), (b"content-length", b"%d" % len(data)), *(headers or [])])
        await self.body(data, more=False)

    async def error(self, exc: SswError, source: str) -> None:
        headers = []
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after is not None:
            headers.append((b"retry-after", str(retry_after).encode()))
        await self.whole(exc.status, envelope(exc, source, self.dialect), headers)


def wrap_worker_error(status: int, data: bytes, dialect: Dialect = Dialect.OPENAI) -> tuple[bytes, str]:
    """A worker's error answer in the route's envelope: its message, type and param
    kept, ``code`` a string (vLLM sends the status number), ``source: worker``."""
    message, type_, param, code = "", "worker_error", None, None
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        body = orjson.loads(data)
        err = body.get("error", body) if isinstance(body, dict) else {}
        if isinstance(err, str):
            err = {"message": err}
        if isinstance(err, dict):
            message = str(err.get("message") or err.get("detail") or "")
            type_ = str(err.get("type") or type_)
            param = err.get("param") if isinstance(err.get("param"), str) else None
            code = err.get("code") if isinstance(err.get("code"), str) else None
    if not message:
        message = data[:500].decode(errors="replace") or f"the worker answered {status}"
    if dialect is Dialect.ANTHROPIC:
        return anthropic_error(status, message, "worker", type_), type_
    wrapped = {"error": {"message": message, "type": type_, "param": param, "code": code, "source": "worker"}}
    return orjson.dumps(wrapped), type_


async def _disconnected(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


NoteResponse = Callable[[Exchange, str], Awaitable[None]]


class Unreached(UpstreamError):
    """No worker took the request (nothing of an answer reached anyone): another host,
    or a load here, may still serve it."""


class Relay:
    def __init__(
        self, cfg: Config, on_used: Callable[[str, str | None, bool], None], on_response: NoteResponse | None = None
    ) -> None:
        gw = cfg.gateway
        limits = Limits(
            max_headers=gw.upstream_max_headers,
            max_header_bytes=gw.upstream_max_header_bytes,
            max_body_bytes=gw.upstream_max_body_bytes,
            headers_timeout_s=gw.upstream_headers_timeout_s,
        )
        self.pool = Pool(gw.upstream_connect_timeout_s, gw.upstream_read_timeout_s, limits)
        self.max_event_bytes = gw.upstream_max_event_bytes
        self.event_timeout_s = gw.upstream_read_timeout_s
        self.routing = cfg.gateway.routing
        self.on_used = on_used
        # Told the id of each stored Response it relays, before the client sees it.
        self.on_response = on_response
        self.rr = RoundRobin()
        self.inflight = InFlight(gw.non_realtime_cap_per_worker, gw.realtime_window_s)
        self._suspect_until: dict[str, float] = {}

    def in_flight(self) -> int:
        return self.inflight.total()

    def healthy_first(self, workers: list[WorkerView]) -> list[WorkerView]:
        """Workers whose socket refused a connection lately go last (they may be restarting)."""
        now = time.monotonic()
        fine = [w for w in workers if self._suspect_until.get(w.unit, 0.0) <= now]
        return fine or workers

    def order(self, model: str, workers: list[WorkerView], priority: str = "interactive") -> list[WorkerView]:
        """The failover sequence for one request. Realtime requests always go to the replica
        with the fewest requests in flight first: they must not queue behind a busy one."""
        workers = self.healthy_first(workers)
        if self.routing == "least_outstanding" or priority == "realtime":
            return least_outstanding(workers, lambda w: self.inflight.count(w.unit), self.rr, model)
        return self.rr.order(model, workers)

    async def forward(
        self,
        model: str,
        head: bytes,
        payload: bytes,
        workers: list[WorkerView],
        ex: Exchange,
        reply: Reply,
        receive: Receive,
        remote: bool = False,
    ) -> None:
        """Send the request to the first worker that takes it and relay the answer.
        ``remote``: the workers are one other host's gateway, tried once (the caller
        passes an unreachable host over and offers the request elsewhere)."""
        ex.sent_at = time.perf_counter()
        last_error: Exception | None = None
        order = self.order(model, workers, ex.priority)
        # Cycle through the pool: a lone worker gets another try too, on a fresh
        # connection (a pooled one may point at a process that was replaced).
        for attempt in range(1 if remote else MAX_FAILOVER_ATTEMPTS):
            worker = order[attempt % len(order)]
            unit = worker.unit
            await self.inflight.enter(unit, model, ex.priority, cap=not remote)
            try:
                resp = await self.pool.request(worker.socket, head, payload)
            except (ConnectFailed, NoAnswer) as exc:
                self.inflight.leave(unit, ex.priority, answered=False)
                # Nothing came back (the worker died, or never took the connection):
                # no byte of an answer can have reached anyone, so the next worker
                # may serve it. Inference has no side effect to repeat.
                log.warning("%s: %s; trying the next worker", unit, exc)
                self._suspect_until[unit] = time.monotonic() + SUSPECT_FOR_S
                last_error = exc
                continue
            except ResponseFailed as exc:
                self.inflight.leave(unit, ex.priority, answered=False)
                log.warning("%s: %s", unit, exc)
                raise UpstreamError(f"{unit} failed before it answered: {exc}") from None
            except BaseException:
                self.inflight.leave(unit, ex.priority, answered=False)
                raise
            # (the adapter it served, when the model asked for is one on a base's worker)
            # Batch work is use too, but only other use protects a model from batch loads.
            self.on_used(unit, model if model != worker.model else None, ex.priority != "batch")
            ex.worker = unit
            try:
                await self._answer(resp, ex, reply, receive)
            finally:
                self.inflight.leave(unit, ex.priority, answered=True)
            return
        raise Unreached(f"no worker of '{model}' could be reached: {last_error}")

    async def _answer(self, resp: Response, ex: Exchange, reply: Reply, receive: Receive) -> None:
        ex.status = resp.status
        ctype = resp.header(b"content-type") or JSON
        if ctype.startswith(b"text/event-stream"):
            await self._stream(resp, ex, reply, receive)
            return
        try:
            # The headers came in time; the body, however it trickles, gets a deadline too.
            async with asyncio.timeout(self.event_timeout_s):
                data = await resp.read()
        except (ResponseFailed, TimeoutError) as exc:
            resp.close()
            why = exc if isinstance(exc, ResponseFailed) else f"no whole body within {self.event_timeout_s:.0f} s"
            log.warning("%s: %s", ex.worker, why)
            raise UpstreamError(f"{ex.worker} failed while it answered: {why}") from None
        except BaseException:
            resp.close()
            raise
        resp.release()
        if resp.status >= 400:
            data, _ = wrap_worker_error(resp.status, data, reply.dialect)
            ex.error = f"worker_{resp.status}"
            await reply.whole(resp.status, data)
            return
        if resp.status == 200 and ctype.startswith(JSON):
            with contextlib.suppress(ValueError, AttributeError):
                answer = orjson.loads(data)
                ex.usage(answer.get("usage"))
                if ex.capture_id and isinstance(answer.get("id"), str):
                    ex.response_id = answer["id"]
            await self._note_response(ex)
        if reply.sse:
            await reply.whole(200, data)
            return
        await reply.start(resp.status, [(b"content-type", ctype), (b"content-length", b"%d" % len(data))])
        await reply.body(data, more=False)

    async def _note_response(self, ex: Exchange) -> None:
        if ex.capture_id and ex.response_id and self.on_response is not None:
            ex.capture_id = False
            await self.on_response(ex, ex.response_id)

    async def _stream(self, resp: Response, ex: Exchange, reply: Reply, receive: Receive) -> None:
        if not reply.started:
            await reply.start_sse()
        # A client that leaves closes the upstream connection: vLLM aborts the request.
        watcher = asyncio.ensure_future(_disconnected(receive))
        watcher.add_done_callback(lambda _: resp.close())
        finished = False
        pending = b""
        # A peer that never ends an event (a byte at a time, or one endless line) is cut
        # off: by the event's size, and by the time since the last whole event.
        loop = asyncio.get_running_loop()
        last_event = loop.time()
        try:
            async for chunk in resp.iter_chunks():
                data = pending + chunk if pending else chunk
                cut = data.rfind(b"\n\n")
                if cut < 0:
                    if len(data) > self.max_event_bytes:
                        raise ResponseFailed(f"a stream event exceeds {self.max_event_bytes} bytes")
                    if loop.time() - last_event > self.event_timeout_s:
                        raise ResponseFailed(f"no whole stream event within {self.event_timeout_s:.0f} s")
                    pending = data
                    continue
                last_event = loop.time()
                if cut + 2 < len(data):
                    data, pending = data[: cut + 2], data[cut + 2 :]
                    if len(pending) > self.max_event_bytes:
                        raise ResponseFailed(f"a stream event exceeds {self.max_event_bytes} bytes")
                else:
                    pending = b""
                out = _inspect(data, ex)
                if ex.capture_id and ex.response_id:
                    await self._note_response(ex)  # before the client can ask for it
                if out:
                    await reply.body(out)
            if pending:
                await reply.body(pending)
            finished = True
        except ResponseFailed as exc:
            if watcher.done():
                ex.error = "client_disconnected"
            else:
                ex.error = "upstream_failed"
                log.warning("%s: the stream broke off: %s", ex.worker, exc)
        finally:
            watcher.cancel()
            if finished:
                resp.release()
            else:
                resp.close()
        if not watcher.cancelled() and watcher.done():
            return  # the client is gone: nothing more to send
        with contextlib.suppress(Exception):
            await reply.end()


def _inspect(events: bytes, ex: Exchange) -> bytes:
    """Note the first token's time, the usage, and a stored Response's id; drop the
    usage chunk when only ssw asked for it. The common case, once the first token
    went by, is a scan."""
    if ex.ttft_s is not None and not ex.capture_id and b'"usage":{' not in events and b'"usage": {' not in events:
        return events
    kept = []
    for event in events.split(b"\n\n"):
        if not event:
            continue
        drop = False
        obj = _event_data(event)
        if obj is not None:
            if ex.ttft_s is None and _has_token(obj):
                ex.ttft_s = time.perf_counter() - ex.t0
            usage = obj.get("usage")
            if usage:
                ex.usage(usage)
                drop = ex.strip_usage and not obj.get("choices")
            else:
                # Responses and Anthropic streams carry it inside the response or message.
                inner = obj.get("response") or obj.get("message")
                if isinstance(inner, dict):
                    ex.usage(inner.get("usage"))
                    if ex.capture_id and obj.get("type") == "response.created" and isinstance(inner.get("id"), str):
                        ex.response_id = inner["id"]
        if not drop:
            kept.append(event + b"\n\n")
    return b"".join(kept)


def _event_data(event: bytes) -> dict[str, Any] | None:
    """The JSON object of an event's data line (OpenAI streams have only that line;
    Responses and Anthropic streams name the event on the line before)."""
    if event.startswith(b"data: {"):
        start = 0
    else:
        start = event.find(b"\ndata: {") + 1
        if start == 0:
            return None
    end = event.find(b"\n", start)
    try:
        obj = orjson.loads(event[start + 6 : end if end >= 0 else len(event)])
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


# Event types that carry generated content: Anthropic's, and the Responses API's
# (response.output_text.delta, response.reasoning_text.delta, ...).
def _has_token(chunk: dict[str, Any]) -> bool:
    kind = chunk.get("type")
    if isinstance(kind, str) and (kind == "content_block_delta" or kind.endswith(".delta")):
        return True
    for choice in chunk.get("choices") or ():
        if isinstance(choice, dict):
            raw_delta = choice.get("delta")
            delta: dict[str, Any] = raw_delta if isinstance(raw_delta, dict) else {}
            if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls") or choice.get("text"):
                return True
    return False
