"""Ollama's API on the public port. Generation and embeddings are translated onto
ssw's own request path (the gateway's handler: admission, scopes, limits,
priorities, waiting for a load, fallbacks, metrics and records apply exactly as
on /v1) and their answers translated back; the listing routes answer from the
gateway's view of the loader; pulls go to the loader's pull jobs. Every error is
Ollama's ``{"error": "..."}`` with the status ssw would give."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from ssw.common.auth import ApiKey
from ssw.common.bodies import parse_body
from ssw.common.contract import ModelView
from ssw.common.routes import match
from ssw.common.states import LoadState
from ssw.errors import BadRequest, LoadFailed, ModelNotFound, NotServed, PayloadTooLarge, RequestTimeout, SswError
from ssw.gateway.admission import body_chunks
from ssw.gateway.ollama import catalog, pull, translate
from ssw.gateway.ollama.answers import StreamTranslator, Timing, created_at, whole
from ssw.gateway.relay import Receive, Send

if TYPE_CHECKING:
    from ssw.gateway.handler import Gateway

VERSION = "0.12.6"  # the Ollama API this front end answers as (clients check it for features)
NDJSON = b"application/x-ndjson"
JSON = b"application/json; charset=utf-8"
IGNORED_HEADER = b"x-ssw-ignored-options"
EXCHANGE = "ssw.exchange"
MAX_NAME = 256
UNSUPPORTED = {
    "/api/create": "creating a model from a Modelfile",
    "/api/push": "pushing a model to a registry",
    "/api/copy": "copying a model (give it an alias in models.yaml)",
    "/api/delete": "deleting a model (remove its directory, then `ssw rescan`)",
    "/api/blobs": "uploading blobs",
}


class OllamaApp:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.routes: dict[tuple[str, str], Callable[[dict[str, Any], Receive, Send], Awaitable[None]]] = {
            ("POST", "/api/chat"): self.chat,
            ("POST", "/api/generate"): self.generate,
            ("POST", "/api/embed"): self.embed,
            ("POST", "/api/embeddings"): self.embeddings,
            ("GET", "/api/tags"): self.tags,
            ("GET", "/api/ps"): self.ps,
            ("POST", "/api/show"): self.show,
            ("POST", "/api/pull"): self.pull,
        }

    @staticmethod
    def serves(path: str) -> bool:
        return path == "/" or path == "/api" or path.startswith("/api/")

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        try:
            if path == "/" and method in ("GET", "HEAD"):
                await answer(send, 200, b"Ollama is running", b"text/plain; charset=utf-8", head=method == "HEAD")
                return
            if path == "/api/version" and method in ("GET", "HEAD"):
                await answer(send, 200, orjson.dumps({"version": VERSION}), JSON, head=method == "HEAD")
                return
            handler = self.routes.get((method, path))
            refused = next((what for prefix, what in UNSUPPORTED.items() if path.startswith(prefix)), None)
            if handler is None and refused is None:
                raise NotServed(f"{method} {path[:80]} is not an Ollama route ssw serves")
            key = self.gw.admission.authenticate(scope["headers"])
            if refused is not None:
                raise Refused(f"ssw does not support {refused}")
            scope["ssw.key"] = key
            assert handler is not None
            await handler(scope, receive, send)
        except SswError as exc:
            await error(send, exc)

    # --- reading ------------------------------------------------------------------------

    async def _body(self, scope: dict[str, Any], receive: Receive) -> dict[str, Any]:
        limits = self.gw.cfg.limits
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise PayloadTooLarge(f"the request body exceeds {limits.max_body_bytes} bytes")
        try:
            async with asyncio.timeout(limits.body_timeout_s):
                raw = await self.gw.admission.read_body(declared, body_chunks(receive))
        except TimeoutError:
            raise RequestTimeout(f"the request body did not arrive within {limits.body_timeout_s:.0f} s") from None
        body = parse_body(raw, limits.max_json_depth)
        name = body.get("model", body.get("name"))
        if not isinstance(name, str) or not name or len(name) > MAX_NAME:
            raise BadRequest("model must name a model")
        # ssw's name for the request; answers give back the name as the client typed it.
        body["model"], body["ssw_asked"] = catalog.untagged(name), name
        return body

    def _view(self, key: ApiKey | None, asked: str) -> tuple[str, ModelView]:
        """The model a name means within the key's scope (404 naming what exists, 403
        outside the scope, as on /v1)."""
        names = self.gw.names
        model = self.gw.admission.resolve_in_scope(key, catalog.untagged(asked), names)
        view = names.models.get(model)
        if view is None:
            raise ModelNotFound(asked, sorted(names.models))
        return model, view

    # --- generation -----------------------------------------------------------------------

    async def chat(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        body = await self._body(scope, receive)
        model, view = self._view(scope["ssw.key"], body["model"])
        t = translate.chat(body, view.details.context_length, view.details.vision, view.chat_template_kwargs)
        await self._generate(scope, receive, send, t, model, body["ssw_asked"])

    async def generate(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        body = await self._body(scope, receive)
        model, view = self._view(scope["ssw.key"], body["model"])
        t = translate.generate(body, view.details.context_length, view.details.vision, view.chat_template_kwargs)
        await self._generate(scope, receive, send, t, model, body["ssw_asked"])

    async def embed(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        body = await self._body(scope, receive)
        model, _ = self._view(scope["ssw.key"], body["model"])
        await self._generate(scope, receive, send, translate.embed(body, legacy=False), model, body["ssw_asked"])

    async def embeddings(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        body = await self._body(scope, receive)
        model, _ = self._view(scope["ssw.key"], body["model"])
        await self._generate(scope, receive, send, translate.embed(body, legacy=True), model, body["ssw_asked"])

    async def _generate(
        self, scope: dict[str, Any], receive: Receive, send: Send, t: translate.Translated, model: str, asked: str
    ) -> None:
        t.model = asked
        key: ApiKey | None = scope["ssw.key"]
        if t.keep_alive_s is not None and key is not None and not key.keep_alive:
            raise Refused(f"key '{key.name}' may not set keep_alive")
        if t.empty and t.kind != "embed":
            await self._load_or_unload(send, t, model)
            return
        if t.keep_alive_s is not None and t.keep_alive_s != 0:
            await self.gw.loader.keep_alive(model, t.keep_alive_s)
        await self._relay(scope, receive, send, t)
        if t.keep_alive_s == 0:
            await self.gw.loader.keep_alive(model, 0)

    async def _load_or_unload(self, send: Send, t: translate.Translated, model: str) -> None:
        """Ollama's idiom: no messages (or prompt) loads the model, and with keep_alive 0
        unloads it."""
        timing = Timing()
        if t.keep_alive_s == 0:
            await self.gw.loader.keep_alive(model, 0)
            reason = "unload"
        else:
            if t.keep_alive_s is not None:
                await self.gw.loader.keep_alive(model, t.keep_alive_s)
            await self._until_ready(model)
            timing.waited_s = time.perf_counter() - timing.started
            reason = "load"
        out: dict[str, Any] = {"model": t.model, "created_at": created_at()}
        out |= {"message": {"role": "assistant", "content": ""}} if t.kind == "chat" else {"response": ""}
        out |= {"done": True, "done_reason": reason} | timing.durations(0, 0)
        await answer(send, 200, orjson.dumps(out), JSON)

    async def _until_ready(self, model: str) -> None:
        deadline = time.monotonic() + self.gw.cfg.gateway.wait_timeout_s
        if not self.gw.names.ready.get(model):
            await self.gw.loader.request_load(model)
        while not self.gw.names.ready.get(model):
            entry = self.gw.names.models.get(model)
            if entry is not None and entry.load.state is LoadState.COOLING_DOWN:
                raise LoadFailed(f"loading {model} failed: {entry.load.last_error or entry.load.reason}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestTimeout(f"{model} was not ready within gateway.wait_timeout_s")
            await self.gw.loader.wait_update(min(left, 1.0))

    async def _relay(self, scope: dict[str, Any], receive: Receive, send: Send, t: translate.Translated) -> None:
        """The translated request through the gateway's own handler, its answer translated back."""
        payload = orjson.dumps(t.body)
        found = match("POST", t.path)
        assert found is not None
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"content-type")]
        headers += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
        if not any(k == b"x-ssw-wait" for k, _ in headers):
            headers.append((b"x-ssw-wait", b"true"))  # Ollama's clients wait for a load
        inner = {**scope, "path": t.path, "raw_path": t.path.encode(), "query_string": b"", "headers": headers}
        sent = False

        async def inner_receive() -> Any:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": payload, "more_body": False}
            return await receive()  # the client leaving, while the answer streams

        timing = Timing()
        out = Translation(send, t, timing, inner)
        await self.gw.proxy(inner, inner_receive, out.send, *found)
        await out.close()

    # --- listing ------------------------------------------------------------------------

    def _allowed(self, key: ApiKey | None) -> set[str] | None:
        return self.gw.admission.allowed_models(key, self.gw.names.expand)

    async def tags(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        names = self.gw.names
        await answer(
            send, 200, orjson.dumps(catalog.tags(names.models, names.aliases, self._allowed(scope["ssw.key"])))
        )

    async def ps(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        names = self.gw.names
        loader = self.gw.loader
        snapshot_at = time.time() - (time.monotonic() - loader.snapshot_at)
        listing = catalog.ps(
            names.models, names.snap.workers, self._allowed(scope["ssw.key"]), snapshot_at, loader.last_used
        )
        await answer(send, 200, orjson.dumps(listing))

    async def show(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        body = await self._body(scope, receive)
        model, view = self._view(scope["ssw.key"], body["model"])
        await answer(send, 200, orjson.dumps(catalog.show(model, view)))

    async def pull(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        key: ApiKey | None = scope["ssw.key"]
        if key is not None and not key.pull:
            raise Refused(f"key '{key.name}' may not pull models (keys.yaml: pull: true, or `ssw keys add --pull`)")
        body = await self._body(scope, receive)
        await pull.run(self.gw, send, body)


class Refused(SswError):
    status = 403
    type = "permission_error"
    code = "not_allowed"


class Translation:
    """The handler's answer to a translated request, as Ollama's: NDJSON lines from a
    stream, one object from a whole answer, ``{"error": ...}`` from an error."""

    def __init__(self, send: Send, t: translate.Translated, timing: Timing, scope: dict[str, Any]) -> None:
        self._send = send
        self.t = t
        self.timing = timing
        self.scope = scope
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.stream: StreamTranslator | None = None
        self.collected = bytearray()
        self.done = False

    def _waited(self) -> None:
        ex = self.scope.get(EXCHANGE)
        self.timing.waited_s = getattr(ex, "waited_s", 0.0)

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = list(message.get("headers", []))
            ctype = next((v for k, v in self.headers if k.lower() == b"content-type"), b"")
            if self.status == 200 and ctype.startswith(b"text/event-stream"):
                self.stream = StreamTranslator(self.t.kind, self.t.model, self.timing)
                await self._send({"type": "http.response.start", "status": 200, "headers": self._our(NDJSON)})
            return
        if message["type"] != "http.response.body":
            return
        chunk = message.get("body", b"")
        if self.stream is not None:
            self._waited()
            lines = self.stream.feed(chunk)
            if not message.get("more_body", False):
                lines += b"".join(self.stream.end())
                self.done = True
            if lines or self.done:
                await self._send({"type": "http.response.body", "body": lines, "more_body": not self.done})
            return
        self.collected += chunk
        if not message.get("more_body", False):
            await self._finish()

    def _our(self, ctype: bytes) -> list[tuple[bytes, bytes]]:
        keep = [(k, v) for k, v in self.headers if k.lower() in (b"retry-after", b"x-ssw-fallback-from")]
        if self.t.ignored:
            keep.append((IGNORED_HEADER, ",".join(self.t.ignored).encode()))
        return [(b"content-type", ctype), *keep]

    async def _finish(self) -> None:
        self.done = True
        self._waited()
        try:
            answer_ = orjson.loads(bytes(self.collected))
        except orjson.JSONDecodeError:
            answer_ = {}
        if self.status != 200 or not isinstance(answer_, dict):
            err = answer_.get("error") if isinstance(answer_, dict) else None
            text = err.get("message") if isinstance(err, dict) else err
            if isinstance(err, dict) and err.get("code") == ModelNotFound.code and isinstance(text, str):
                text = not_found(text)
            body = orjson.dumps({"error": str(text or f"the request failed ({self.status})")})
            await self._whole(self.status if self.status >= 400 else 502, body)
            return
        out = whole(self.t.kind, self.t.model, answer_, self.timing, self.t.legacy_embedding)
        if self.t.stream and self.t.kind != "embed":
            await self._whole(200, orjson.dumps(out) + b"\n", NDJSON)  # one line: an answer that did not stream
            return
        await self._whole(200, orjson.dumps(out))

    async def _whole(self, status: int, body: bytes, ctype: bytes = JSON) -> None:
        await self._send({"type": "http.response.start", "status": status, "headers": self._our(ctype)})
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    async def close(self) -> None:
        """A stream the handler ended without a last event still gets Ollama's last line."""
        if self.stream is not None and not self.done:
            self.done = True
            await self._send({"type": "http.response.body", "body": b"".join(self.stream.end()), "more_body": False})


async def answer(
    send: Send,
    status: int,
    body: bytes,
    ctype: bytes = JSON,
    head: bool = False,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype), *(headers or [])]}
    )
    await send({"type": "http.response.body", "body": b"" if head else body, "more_body": False})


def not_found(message: str) -> str:
    """Ollama's words for a model that does not exist (clients offer to pull on them)."""
    return message.replace("The model ", "model ", 1).replace(" does not exist.", " not found.", 1)


async def error(send: Send, exc: SswError) -> None:
    if isinstance(exc, ModelNotFound):
        exc.message = not_found(exc.message)
    headers = []
    retry = getattr(exc, "retry_after_s", None)
    if isinstance(retry, int | float) and retry:
        headers.append((b"retry-after", b"%d" % int(retry)))
    await answer(send, exc.status, orjson.dumps({"error": exc.message}), JSON, headers=headers)
