"""The fake engine's other APIs, mounted per model task as vLLM 0.32 mounts them:
the Responses API (stored responses, retrieve, cancel, previous_response_id,
typed event streams), Anthropic Messages (and count_tokens), pooling, classify,
score and rerank, audio transcription and translation (multipart, with the
model as a form field), tokenize and detokenize; and vLLM's development and
control endpoints, which answer 200 to whoever reaches them (a test proves
the gateway never lets anyone do so: every path a worker is asked for is
listed at GET /ssw-fake/seen)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ssw.common.routes import Family

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# What vLLM mounts besides inference (with VLLM_SERVER_DEV_MODE=1 and its RL and
# scale-out routers): none of it may ever be reached through ssw.
CONTROL_PATHS = (
    ("POST", "/sleep"),
    ("POST", "/wake_up"),
    ("GET", "/is_sleeping"),
    ("POST", "/release_kv_cache_memory"),
    ("POST", "/collective_rpc"),
    ("POST", "/update_weights"),
    ("POST", "/start_weight_update"),
    ("POST", "/finish_weight_update"),
    ("POST", "/init_weight_transfer_engine"),
    ("GET", "/weight_info"),
    ("POST", "/reset_prefix_cache"),
    ("POST", "/reset_mm_cache"),
    ("POST", "/reset_encoder_cache"),
    ("POST", "/start_profile"),
    ("POST", "/stop_profile"),
    ("POST", "/pause"),
    ("POST", "/resume"),
    ("GET", "/is_paused"),
    ("POST", "/abort_requests"),
    ("GET", "/server_info"),
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"),
    ("GET", "/tokenizer_info"),
    ("POST", "/v1/chat/completions/render"),
    ("POST", "/v1/completions/render"),
    ("POST", "/v1/responses/render"),
    ("POST", "/v1/messages/render"),
    ("POST", "/inference/v1/generate"),
    ("POST", "/inference/v1/abort_requests"),
    ("POST", "/v1/chat/completions/batch"),
    ("POST", "/invocations"),
    ("GET", "/ping"),
    ("GET", "/version"),
    ("GET", "/load"),
    ("POST", "/scale_elastic_ep"),
    ("POST", "/is_scaling_elastic_ep"),
    ("POST", "/generative_scoring"),
    ("POST", "/v1/systemone"),
    ("GET", "/kv_event_sources"),
    ("GET", "/fault_tolerance/status"),
)


@dataclass
class Engine:
    """What the fake's handlers share: the served names, the generation pace, errors."""

    names: list[str]
    delay: float  # seconds per token
    socket: str | None
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)  # Responses kept (store)
    background: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def error(self, status: int, message: str, anthropic: bool = False) -> web.Response:
        if anthropic:
            return web.json_response(
                {"type": "error", "error": {"type": "not_found_error", "message": message}}, status=status
            )
        return web.json_response(
            {"error": {"message": message, "type": "BadRequestError", "code": status}}, status=status
        )

    def wrong_model(self, model: object, anthropic: bool = False) -> web.Response | None:
        if model in self.names:
            return None
        return self.error(404, f"The model `{model}` does not exist.", anthropic)

    async def pace(self, n_tokens: int) -> None:
        if self.delay:
            await asyncio.sleep(self.delay * n_tokens)


def _words(n: int) -> list[str]:
    return [f"t{i}" for i in range(n)]


def _sse(event: str | None, data: dict[str, Any]) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(data).encode() + b"\n\n"


# --- Responses API ---------------------------------------------------------------------------


def responses_routes(e: Engine) -> list[tuple[str, str, Handler]]:
    def response_object(rid: str, body: dict[str, Any], text: str, status: str, n: int) -> dict[str, Any]:
        prompt = len(json.dumps(body.get("input")))
        return {
            "id": rid,
            "object": "response",
            "created_at": int(time.time()),
            "model": e.names[0],
            "status": status,
            "output": [
                {
                    "id": "msg_" + uuid.uuid4().hex,
                    "type": "message",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ]
            if status == "completed"
            else [],
            "previous_response_id": body.get("previous_response_id"),
            "usage": {
                "input_tokens": prompt,
                "output_tokens": n,
                "total_tokens": prompt + n,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            }
            if status == "completed"
            else None,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "ssw_echo": {"socket": e.socket},
        }

    async def create(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if (wrong := e.wrong_model(body.get("model"))) is not None:
            return wrong
        previous = body.get("previous_response_id")
        if previous is not None and previous not in e.stored:
            return e.error(404, f"Response with id '{previous}' not found.")
        n = int(body.get("max_output_tokens") or 8)
        # Answers that say which response they continue, so a test sees the right worker got it.
        text = " ".join(_words(n)) + (f" (after {previous})" if previous else "")
        rid = "resp_" + uuid.uuid4().hex
        store = body.get("store", True) is not False
        if body.get("background"):
            obj = response_object(rid, body, text, "queued", n)
            e.stored[rid] = obj

            async def run() -> None:
                obj["status"] = "in_progress"
                await asyncio.sleep(max(e.delay * n, 30.0))  # long enough to be cancelled
                e.stored[rid] = response_object(rid, body, text, "completed", n)

            e.background[rid] = asyncio.ensure_future(run())
            return web.json_response(obj)
        if not body.get("stream"):
            await e.pace(n)
            obj = response_object(rid, body, text, "completed", n)
            if store:
                e.stored[rid] = obj
            return web.json_response(obj)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        seq = 0

        async def send(kind: str, **data: Any) -> None:
            nonlocal seq
            await resp.write(_sse(kind, {"type": kind, "sequence_number": seq, **data}))
            seq += 1

        started = response_object(rid, body, "", "in_progress", n)
        await send("response.created", response=started)
        await send("response.in_progress", response=started)
        item = {
            "id": "msg_" + uuid.uuid4().hex,
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        await send("response.output_item.added", output_index=0, item=item)
        await send(
            "response.content_part.added",
            item_id=item["id"],
            output_index=0,
            content_index=0,
            part={"type": "output_text", "text": "", "annotations": []},
        )
        pieces = text.split(" ")
        for i, word in enumerate(pieces):
            await e.pace(1)
            delta = word if i == 0 else " " + word
            await send(
                "response.output_text.delta",
                item_id=item["id"],
                output_index=0,
                content_index=0,
                delta=delta,
                logprobs=[],
            )
        await send(
            "response.output_text.done", item_id=item["id"], output_index=0, content_index=0, text=text, logprobs=[]
        )
        done = response_object(rid, body, text, "completed", n)
        if store:
            e.stored[rid] = done
        await send("response.completed", response=done)
        return resp

    async def retrieve(request: web.Request) -> web.StreamResponse:
        rid = request.match_info["rid"]
        if rid not in e.stored:
            return e.error(404, f"Response with id '{rid}' not found.")
        return web.json_response(e.stored[rid])

    async def cancel(request: web.Request) -> web.StreamResponse:
        rid = request.match_info["rid"]
        if rid not in e.stored:
            return e.error(404, f"Response with id '{rid}' not found.")
        task = e.background.pop(rid, None)
        if task is None:
            return e.error(400, "Cannot cancel a synchronous response.")
        task.cancel()
        e.stored[rid]["status"] = "cancelled"
        return web.json_response(e.stored[rid])

    return [
        ("POST", "/v1/responses", create),
        ("GET", "/v1/responses/{rid}", retrieve),
        ("POST", "/v1/responses/{rid}/cancel", cancel),
    ]


# --- Anthropic Messages ----------------------------------------------------------------------------


def messages_routes(e: Engine) -> list[tuple[str, str, Handler]]:
    async def create(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if (wrong := e.wrong_model(body.get("model"), anthropic=True)) is not None:
            return wrong
        n = int(body.get("max_tokens") or 16)
        prompt = len(json.dumps(body.get("messages")))
        text = " ".join(_words(n))
        mid = "msg_" + uuid.uuid4().hex
        if not body.get("stream"):
            await e.pace(n)
            return web.json_response(
                {
                    "id": mid,
                    "type": "message",
                    "role": "assistant",
                    "model": e.names[0],
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": "max_tokens",
                    "stop_sequence": None,
                    "usage": {"input_tokens": prompt, "output_tokens": n},
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        message = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": e.names[0],
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": prompt, "output_tokens": 0},
        }
        await resp.write(_sse("message_start", {"type": "message_start", "message": message}))
        await resp.write(
            _sse(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            )
        )
        await resp.write(_sse("ping", {"type": "ping"}))
        for i, word in enumerate(text.split(" ")):
            await e.pace(1)
            delta = {"type": "text_delta", "text": word if i == 0 else " " + word}
            await resp.write(_sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}))
        await resp.write(_sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
        await resp.write(
            _sse(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                    "usage": {"output_tokens": n},
                },
            )
        )
        await resp.write(_sse("message_stop", {"type": "message_stop"}))
        return resp

    async def count_tokens(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if (wrong := e.wrong_model(body.get("model"), anthropic=True)) is not None:
            return wrong
        return web.json_response({"input_tokens": len(json.dumps(body.get("messages")))})

    return [("POST", "/v1/messages", create), ("POST", "/v1/messages/count_tokens", count_tokens)]


# --- pooling, classify, score, rerank ---------------------------------------------------------


def _vector(text: object) -> list[float]:
    s = str(text)
    return [0.1, 0.2, 0.3, float(len(s))]


def pooling_routes(e: Engine, families: frozenset[Family]) -> list[tuple[str, str, Handler]]:
    def envelope(kind: str, data: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
        return {
            "id": f"{kind}-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": e.names[0],
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        }

    def items(value: object) -> list[object]:
        return value if isinstance(value, list) else [value]

    async def embeddings(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if (wrong := e.wrong_model(body.get("model"))) is not None:
            return wrong
        texts = items(body.get("input", body.get("messages")))
        data = [{"object": "embedding", "index": i, "embedding": _vector(x)} for i, x in enumerate(texts)]
        return web.json_response(envelope("embd", data, len(texts)))

    async def embed_v2(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if (wrong := e.wrong_model(body.get("model"))) is not None:
            return wrong
        texts = items(body.get("texts"))
        return web.json_response(
            {
                "id": uuid.uuid4().hex,
                "embeddings": {"float": [_vector(t) for t in texts]},
                "texts": texts,
                "meta": {"billed_units": {"input_tokens": len(texts)}},
            }
        )

    async def pooling(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if (wrong := e.wrong_model(body.get("model"))) is not None:
            return wrong
        texts = items(body.get("input"))
        data = [{"index": i, "object": "pooling", "data": _vector(x)} for i, x in enumerate(texts)]
        return web.json_response(envelope("pool", data, len(texts)))

    async def classify(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if (wrong := e.wrong_model(body.get("model"))) is not None:
            return wrong
        texts = items(body.get("input"))
        data = [{"index": i, "label": "LABEL_0", "probs": [0.75, 0.25], "num_classes": 2} for i in range(len(texts))]
        return web.json_response(envelope("classify", data, len(texts)))

    def relevance(query: object, doc: object) -> float:
        q, d = set(str(query).split()), set(str(doc).split())
        return round(len(q & d) / max(len(q | d), 1), 4)

    async def score(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if (wrong := e.wrong_model(body.get("model"))) is not None:
            return wrong
        first = body.get("queries", body.get("text_1"))
        second = items(body.get("documents", body.get("text_2")))
        data = [{"index": i, "object": "score", "score": relevance(first, d)} for i, d in enumerate(second)]
        return web.json_response(envelope("score", data, len(second) + 1))

    async def rerank(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if (wrong := e.wrong_model(body.get("model"))) is not None:
            return wrong
        docs = items(body.get("documents"))
        results = sorted(
            (
                {"index": i, "document": {"text": d}, "relevance_score": relevance(body.get("query"), d)}
                for i, d in enumerate(docs)
            ),
            key=lambda r: -float(r["relevance_score"]),
        )
        top = body.get("top_n") or len(results)
        return web.json_response(
            {
                "id": f"rerank-{uuid.uuid4().hex}",
                "model": e.names[0],
                "usage": {"total_tokens": len(docs) + 1},
                "results": results[:top],
            }
        )

    routes: list[tuple[str, str, Handler]] = [("POST", "/pooling", pooling)]
    if Family.EMBEDDINGS in families:
        routes += [("POST", "/v1/embeddings", embeddings), ("POST", "/v2/embed", embed_v2)]
    if Family.CLASSIFY in families:
        routes.append(("POST", "/classify", classify))
    if Family.SCORE in families:
        routes += [("POST", "/v1/score", score), ("POST", "/score", score)]
    if Family.RERANK in families:
        routes += [("POST", path, rerank) for path in ("/v1/rerank", "/v2/rerank", "/rerank")]
    return routes


# --- audio -----------------------------------------------------------------------------------------


def audio_routes(e: Engine) -> list[tuple[str, str, Handler]]:
    def handler(kind: str) -> Handler:
        async def serve(request: web.Request) -> web.StreamResponse:
            form = await request.post()
            if (wrong := e.wrong_model(form.get("model"))) is not None:
                return wrong
            upload = form.get("file")
            if not isinstance(upload, web.FileField):
                return e.error(400, "'file' is required")
            size = len(upload.file.read())
            text = f"fake {kind} of {size} bytes from {upload.filename}"
            if str(form.get("stream", "false")).lower() != "true":
                return web.json_response({"text": text, "usage": {"type": "duration", "seconds": 1}})
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for word in text.split(" "):
                await e.pace(1)
                chunk = {
                    "id": uuid.uuid4().hex,
                    "object": "transcription.chunk",
                    "created": int(time.time()),
                    "model": e.names[0],
                    "choices": [{"delta": {"content": word + " "}}],
                }
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            return resp

        return serve

    return [
        ("POST", "/v1/audio/transcriptions", handler("transcription")),
        ("POST", "/v1/audio/translations", handler("translation")),
    ]


# --- tokenize ----------------------------------------------------------------------------------------


def tokenize_routes(e: Engine) -> list[tuple[str, str, Handler]]:
    async def tokenize(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if (wrong := e.wrong_model(body.get("model"))) is not None:
            return wrong
        text = body.get("prompt") if "prompt" in body else json.dumps(body.get("messages"))
        tokens = [ord(c) for c in str(text)]
        return web.json_response({"count": len(tokens), "max_model_len": 2048, "tokens": tokens})

    async def detokenize(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if (wrong := e.wrong_model(body.get("model"))) is not None:
            return wrong
        return web.json_response({"prompt": "".join(chr(t) for t in body.get("tokens") or [])})

    return [("POST", "/tokenize", tokenize), ("POST", "/detokenize", detokenize)]


def control_routes() -> list[tuple[str, str, Handler]]:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response({"ok": True, "path": request.path})

    return [(method, path, answer) for method, path in CONTROL_PATHS]
