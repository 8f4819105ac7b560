"""A fast OpenAI-compatible stand-in for vLLM's API server, for tests and
benchmarks. It takes vLLM's command line (unknown flags are ignored) and these
knobs, as flags or SSW_FAKE_* environment variables:

  --load-delay S         seconds before /health answers (SSW_FAKE_LOAD_DELAY)
  --tokens-per-second N  generation speed; 0 = as fast as possible (SSW_FAKE_TPS)
  --fail MODE            'exit-on-start': exit 3 before listening (after the load delay);
                         'unhealthy': listen but /health answers 503 (SSW_FAKE_FAIL)
  --backlog N            the listening socket's backlog (SSW_FAKE_BACKLOG)
  --max-num-seqs N       requests generated at once (SSW_FAKE_MAX_SEQS; 0 = no limit); more
                         queue, lowest body 'priority' first as vLLM's priority scheduling
                         does, and count as vllm:num_requests_waiting: the contention of a GPU
  --also-port N          with --uds, also listen on 127.0.0.1:N (SSW_FAKE_TCP_PORT): inside
                         a worker's private network namespace, for benchmarks that
                         compare going through a relay with going straight to it

With --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1 it serves vLLM's sleep
API: POST /sleep?level=N, POST /wake_up, GET /is_sleeping. A sleep with
requests in flight fails (vLLM's engine crashes then: vLLM issue #28714). At
level 1 the "weights" move into host RAM (SSW_FAKE_WEIGHTS_MB of real,
resident memory, which the unit's MemoryCurrent shows); level 2 drops them.
Sleeping takes SSW_FAKE_SLEEP_S, waking SSW_FAKE_WAKE_S (level 2: twice that).
On a unix socket it reports the device memory it holds in a file next to the
socket, `device-memory` (SSW_VRAM_BYTES while awake, SSW_FAKE_RESIDUAL_BYTES
asleep), which ssw's simulated GPU source reads as NVML would measure a real
process. Faults, for tests: SSW_FAKE_SLEEP_LEAK=1 keeps the memory after a
sleep (vLLM issue #32714); POST /ssw-fake/fail-wake makes the next wake fail,
POST /ssw-fake/break-on-wake makes it wake into an engine that cannot
generate, and POST /ssw-fake/garble-on-wake (or SSW_FAKE_WRONG_AFTER_WAKE=1)
into one that answers, wrongly ("x0 x1 …" where it said "t0 t1 …": vLLM
issues #16234, gibberish after a level-2 wake).

With --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 it serves vLLM's
runtime LoRA API (POST /v1/load_lora_adapter, /v1/unload_lora_adapter): a
loaded adapter is listed in /v1/models with its parent and may be asked for
by name; its answers say which adapter served them (ssw_echo.lora).

Like vLLM it serves on --uds PATH (a unix socket) or --host/--port, reports
the requests it holds as vllm:num_requests_running on /metrics, and on SIGTERM
lets in-flight requests finish for --shutdown-timeout seconds. For tests,
POST /ssw-fake/break makes it fail every generation with a 500 while /health
stays 200 (an engine that cannot generate), GET /ssw-fake/stats counts
running and aborted streams, and GET /ssw-fake/seen lists every path it was
asked for. It mounts the routes vLLM would for the model's task
(fake_apis.py), and lists them in /openapi.json as vLLM does.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import fake_apis
from aiohttp import web

from ssw.common.routes import Family
from ssw.loader.models.capabilities import Shape, predict
from ssw.loader.models.registry import read_facts


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--served-model-name", nargs="+")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--uds")
    p.add_argument("--backlog", type=int, default=int(os.environ.get("SSW_FAKE_BACKLOG", "128")))
    p.add_argument("--also-port", type=int, default=int(os.environ.get("SSW_FAKE_TCP_PORT", "0")))
    p.add_argument("--shutdown-timeout", type=float, default=0.0)
    p.add_argument("--load-delay", type=float, default=float(os.environ.get("SSW_FAKE_LOAD_DELAY", "0")))
    p.add_argument("--tokens-per-second", type=float, default=float(os.environ.get("SSW_FAKE_TPS", "0")))
    p.add_argument("--fail", default=os.environ.get("SSW_FAKE_FAIL", ""))
    p.add_argument("--max-num-seqs", type=int, default=int(os.environ.get("SSW_FAKE_MAX_SEQS", "0")))
    p.add_argument("--runner", default="auto")
    p.add_argument("--convert", default="auto")
    p.add_argument("--enable-sleep-mode", action="store_true")
    p.add_argument("--enable-lora", action="store_true")
    p.add_argument("--max-loras", type=int, default=1)
    # vLLM's multi-node backend (a model across hosts): rank 0 serves once every other
    # rank has joined it on --master-addr:--master-port, and fails when one leaves.
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=29500)
    args, _unknown = p.parse_known_args(argv)
    return args


def chat_extras(body: dict) -> tuple[str | None, str | None, list[dict] | None]:
    """What vLLM's parsers would make of a chat request, faked: a tool call to the first
    tool when tools are offered, a JSON object naming the requested format and schema, and
    a reasoning text when the template's thinking is on. (content, reasoning, tool calls)"""
    content = reasoning = None
    calls = None
    tools = body.get("tools") or []
    if tools and body.get("tool_choice") != "none":
        name = tools[0].get("function", {}).get("name", "tool")
        calls = [{"id": "call_0", "type": "function", "function": {"name": name, "arguments": '{"ssw_fake": true}'}}]
    fmt = body.get("response_format")
    if isinstance(fmt, dict):
        content = json.dumps({"format": fmt.get("type"), "schema": (fmt.get("json_schema") or {}).get("schema")})
    if (body.get("chat_template_kwargs") or {}).get("enable_thinking"):
        reasoning = "fake thoughts"
    return content, reasoning, calls


def make_app(args: argparse.Namespace) -> web.Application:
    names = args.served_model_name or [args.model]
    ready_at = time.monotonic() + args.load_delay
    delay = 1.0 / args.tokens_per_second if args.tokens_per_second > 0 else 0.0
    stats = {"running": 0, "aborted": 0, "in_flight": 0, "generations": 0}
    broken = {"generate": False, "garbled": False}
    sleep_api = args.enable_sleep_mode and os.environ.get("VLLM_SERVER_DEV_MODE") == "1"
    asleep: dict[str, object] = {
        "level": 0,
        "weights": None,
        "fail_wake": False,
        "break_on_wake": False,
        "garble_on_wake": os.environ.get("SSW_FAKE_WRONG_AFTER_WAKE") == "1",
    }
    memory_file = Path(args.uds).parent / "device-memory" if args.uds else None
    budget = int(os.environ.get("SSW_VRAM_BYTES", "0"))
    residual = int(os.environ.get("SSW_FAKE_RESIDUAL_BYTES", str(300 * 10**6)))
    sleeps = {"count": 0, "in_flight_at_sleep": []}

    def report_memory(value: int) -> None:
        if memory_file is not None and budget:
            tmp = memory_file.with_suffix(".tmp")
            tmp.write_text(str(value))
            tmp.replace(memory_file)

    async def memory_once_loaded() -> None:
        await asyncio.sleep(max(ready_at - time.monotonic(), 0))
        report_memory(budget)

    async def do_sleep(request: web.Request) -> web.Response:
        level = int(request.query.get("level", "1"))
        sleeps["in_flight_at_sleep"].append(stats["in_flight"])  # type: ignore[union-attr]
        if stats["in_flight"]:
            return error(500, f"EngineCore died: sleep with {stats['in_flight']} requests in flight")
        await asyncio.sleep(float(os.environ.get("SSW_FAKE_SLEEP_S", "0.3")))
        if level == 1:
            # Resident, as pinned host memory is: every page written.
            asleep["weights"] = b"\x01" * (int(os.environ.get("SSW_FAKE_WEIGHTS_MB", "0")) * 2**20)
        asleep["level"] = level
        sleeps["count"] += 1  # type: ignore[operator]
        if os.environ.get("SSW_FAKE_SLEEP_LEAK") != "1":
            report_memory(min(residual, budget))
        return web.Response(status=200)

    async def wake_up(_: web.Request) -> web.Response:
        level = int(asleep["level"])  # type: ignore[call-overload]
        if not level:
            return web.Response(status=200)
        await asyncio.sleep(float(os.environ.get("SSW_FAKE_WAKE_S", "0.5")) * level)
        if asleep["fail_wake"]:
            asleep["fail_wake"] = False
            return error(500, "CUDA error: out of memory (fake engine failing its wake on purpose)")
        asleep["level"], asleep["weights"] = 0, None
        report_memory(budget)
        if asleep["break_on_wake"]:
            broken["generate"] = True
        if asleep["garble_on_wake"]:
            broken["garbled"] = True
        return web.Response(status=200)

    async def is_sleeping(_: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": bool(asleep["level"])})

    async def fail_wake(_: web.Request) -> web.Response:
        asleep["fail_wake"] = True
        return web.json_response({"ok": True})

    async def break_on_wake(_: web.Request) -> web.Response:
        asleep["break_on_wake"] = True
        return web.json_response({"ok": True})

    async def garble_on_wake(_: web.Request) -> web.Response:
        asleep["garble_on_wake"] = True
        return web.json_response({"ok": True})

    async def fake_sleeps(_: web.Request) -> web.Response:
        return web.json_response({**sleeps, "level": asleep["level"]})

    def error(status: int, message: str) -> web.Response:
        return web.json_response(
            {"error": {"message": message, "type": "BadRequestError", "code": status}}, status=status
        )

    async def health(_: web.Request) -> web.Response:
        if args.fail == "unhealthy" or time.monotonic() < ready_at or GROUP["joined"] < args.nnodes - 1:
            return web.Response(status=503)
        return web.Response(status=200)

    loras: dict[str, str] = {}  # name -> path, as vLLM's runtime LoRA API keeps them
    lora_api = args.enable_lora and os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING") == "1"

    async def models(_: web.Request) -> web.Response:
        data = [{"id": n, "object": "model", "parent": None} for n in names]
        data += [{"id": n, "object": "model", "parent": names[0], "root": p} for n, p in loras.items()]
        return web.json_response({"object": "list", "data": data})

    async def load_lora(request: web.Request) -> web.Response:
        body = await request.json()
        name, path = body.get("lora_name"), body.get("lora_path")
        if name in loras:
            return error(400, f"The lora adapter '{name}' has already been loaded.")
        if not path or not await asyncio.to_thread(os.path.isfile, os.path.join(path, "adapter_config.json")):
            return error(400, f"Loading lora {name} failed: No adapter found for {path}")
        loras[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(request: web.Request) -> web.Response:
        name = (await request.json()).get("lora_name")
        if loras.pop(name, None) is None:
            return error(404, f"The lora adapter '{name}' cannot be found.")
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    slots = {"free": args.max_num_seqs}
    queue: list[tuple[float, int, asyncio.Future[None]]] = []
    order = itertools.count()

    async def acquire(priority: float) -> None:
        if args.max_num_seqs <= 0:
            return
        if slots["free"] > 0 and not queue:
            slots["free"] -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (priority, next(order), fut)
        heapq.heappush(queue, entry)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                release()  # it was handed a slot as it went away
            elif entry in queue:
                queue.remove(entry)
                heapq.heapify(queue)
            raise

    def release() -> None:
        if args.max_num_seqs <= 0:
            return
        while queue:
            _, _, fut = heapq.heappop(queue)
            if not fut.done():
                fut.set_result(None)  # the slot passes to the first in line
                return
        slots["free"] += 1

    async def generate(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        priority = body.get("priority") if isinstance(body.get("priority"), int | float) else 0
        await acquire(priority)
        stats["in_flight"] += 1
        stats["generations"] += 1
        try:
            return await _generate(request)
        finally:
            stats["in_flight"] -= 1
            release()

    async def _generate(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if asleep["level"]:
            return error(500, "the engine is sleeping (fake engine)")
        if broken["generate"]:
            return error(500, "EngineCore encountered an issue (fake engine broken on purpose)")
        if body.get("model") not in names and body.get("model") not in loras:
            return error(404, f"The model `{body.get('model')}` does not exist.")
        if isinstance(body.get("ssw_test_status"), int):  # a test's way to get an error answer
            return error(body["ssw_test_status"], "failed on purpose (ssw_test_status)")
        chat = request.path.endswith("/chat/completions")
        served = body["model"]  # the base's name, or an adapter's (as vLLM answers)
        n_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        prompt_tokens = len(json.dumps(body.get("messages") or body.get("prompt") or ""))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        # Echo what the request carried that a test may want to see arrive.
        echo = {
            "chat_template_kwargs": body.get("chat_template_kwargs"),
            "extra": body.get("ssw_test_extra"),
            "socket": args.uds,
            "priority": body.get("priority"),
            "lora": body.get("model") if body.get("model") in loras else None,
        }
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": n_tokens,
            "total_tokens": prompt_tokens + n_tokens,
        }
        if not body.get("stream"):
            if delay:
                await asyncio.sleep(delay * n_tokens)
            prefix = "x" if broken["garbled"] else "t"
            text = " ".join(f"{prefix}{i}" for i in range(n_tokens))
            choice: dict[str, object] = (
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                if chat
                else {"index": 0, "text": text, "finish_reason": "length"}
            )
            if chat:
                content, reasoning, calls = chat_extras(body)
                message = {"role": "assistant", "content": text if content is None else content}
                if reasoning:
                    message["reasoning_content"] = reasoning
                if calls:
                    message |= {"content": "", "tool_calls": calls}
                    choice["finish_reason"] = "tool_calls"
                choice["message"] = message
            if not chat and body.get("logprobs"):
                tokens = text.split(" ")
                choice["logprobs"] = {"tokens": tokens, "token_logprobs": [-0.25 * (i + 1) for i in range(len(tokens))]}
            return web.json_response(
                {
                    "id": rid,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": created,
                    "model": served,
                    "choices": [choice],
                    "usage": usage,
                    "ssw_echo": echo,
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        stats["running"] += 1
        try:
            await stream(resp, chat, n_tokens, rid, created, body, usage, served)
        except (ConnectionResetError, asyncio.CancelledError):
            # The reader went away: stop generating, as vLLM aborts the request.
            stats["aborted"] += 1
            raise
        finally:
            stats["running"] -= 1
        return resp

    async def stream(
        resp: web.StreamResponse,
        chat: bool,
        n_tokens: int,
        rid: str,
        created: int,
        body: dict,
        usage: dict,
        served: str,
    ) -> None:
        obj = "chat.completion.chunk" if chat else "text_completion"
        content, reasoning, calls = chat_extras(body) if chat else (None, None, None)
        pieces = [{"delta": {"content": f"t{i} "}} if chat else {"text": f"t{i} "} for i in range(n_tokens)]
        if content is not None:
            pieces = [{"delta": {"content": content}}]
        if calls:
            call = calls[0]
            head = {"index": 0, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"]}}
            args_part = {"index": 0, "function": {"arguments": call["function"]["arguments"]}}
            pieces = [{"delta": {"tool_calls": [head]}}, {"delta": {"tool_calls": [args_part]}}]
        if reasoning:
            pieces.insert(0, {"delta": {"reasoning_content": reasoning}})
        for piece in pieces:
            if delay:
                await asyncio.sleep(delay)
            chunk = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": served,
                "choices": [{"index": 0, **piece, "finish_reason": None}],
            }
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        last = {
            "id": rid,
            "object": obj,
            "created": created,
            "model": served,
            "choices": [
                {
                    "index": 0,
                    **({"delta": {}} if chat else {"text": ""}),
                    "finish_reason": "tool_calls" if calls else "length",
                }
            ],
        }
        await resp.write(b"data: " + json.dumps(last).encode() + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(
                b"data: "
                + json.dumps(
                    {"id": rid, "object": obj, "created": created, "model": served, "choices": [], "usage": usage}
                ).encode()
                + b"\n\n"
            )
        await resp.write(b"data: [DONE]\n\n")

    async def fake_stats(_: web.Request) -> web.Response:
        return web.json_response({k: v for k, v in stats.items() if k != "in_flight"})

    async def fake_break(_: web.Request) -> web.Response:
        broken["generate"] = True
        return web.json_response(broken)

    async def metrics(_: web.Request) -> web.Response:
        lines = [
            "# TYPE vllm:num_requests_running gauge",
            f'vllm:num_requests_running{{model_name="{names[0]}"}} {stats["in_flight"]}',
            "# TYPE vllm:num_requests_waiting gauge",
            f'vllm:num_requests_waiting{{model_name="{names[0]}"}} {len(queue)}',
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    seen: list[str] = []  # every path asked for, but the fake's own
    traceparents: list[str] = []  # the trace context of each request that carried one (ssw's relay sends it)

    @web.middleware
    async def note(request: web.Request, handler: fake_apis.Handler) -> web.StreamResponse:
        if not request.path.startswith("/ssw-fake/"):
            seen.append(f"{request.method} {request.path}")
            if "traceparent" in request.headers:
                traceparents.append(request.headers["traceparent"])
        return await handler(request)

    async def fake_seen(_: web.Request) -> web.Response:
        return web.json_response(seen)

    async def fake_traceparents(_: web.Request) -> web.Response:
        return web.json_response(traceparents)

    # The routes vLLM would mount for this model's task (its architecture, --runner, --convert).
    facts = read_facts(Path(args.model))
    shape = Shape(facts.architectures, facts.sentence_transformers, facts.num_labels, args.runner, args.convert)
    families = predict(shape)
    engine = fake_apis.Engine(names, delay, args.uds)
    routes: list[tuple[str, str, fake_apis.Handler]] = [
        ("GET", "/health", health),
        ("GET", "/metrics", metrics),
        ("GET", "/v1/models", models),
        *fake_apis.tokenize_routes(engine),
        *fake_apis.control_routes(),
    ]
    if Family.CHAT in families:
        routes += [("POST", "/v1/chat/completions", generate), ("POST", "/v1/completions", generate)]
        routes += fake_apis.responses_routes(engine) + fake_apis.messages_routes(engine)
    if Family.POOLING in families:
        routes += fake_apis.pooling_routes(engine, families)
    if Family.TRANSCRIPTION in families:
        routes += fake_apis.audio_routes(engine)

    async def openapi(_: web.Request) -> web.Response:
        paths: dict[str, dict[str, object]] = {}
        for method, path, _handler in routes:
            paths.setdefault(path.replace("{rid}", "{response_id}"), {})[method.lower()] = {}
        return web.json_response({"openapi": "3.1.0", "paths": paths})

    app = web.Application(middlewares=[note])
    app.router.add_get("/ssw-fake/stats", fake_stats)
    app.router.add_post("/ssw-fake/break", fake_break)
    app.router.add_get("/ssw-fake/seen", fake_seen)
    app.router.add_get("/ssw-fake/traceparents", fake_traceparents)
    app.router.add_get("/ssw-fake/sleeps", fake_sleeps)
    app.router.add_post("/ssw-fake/fail-wake", fail_wake)
    app.router.add_post("/ssw-fake/break-on-wake", break_on_wake)
    app.router.add_post("/ssw-fake/garble-on-wake", garble_on_wake)
    if lora_api:
        lora_routes = {("POST", "/v1/load_lora_adapter"): load_lora, ("POST", "/v1/unload_lora_adapter"): unload_lora}
        routes = [(m, p, lora_routes.get((m, p), h)) for m, p, h in routes]
    if sleep_api:
        sleep_routes = {
            ("POST", "/sleep"): do_sleep,
            ("POST", "/wake_up"): wake_up,
            ("GET", "/is_sleeping"): is_sleeping,
        }
        routes = [(m, p, sleep_routes.get((m, p), h)) for m, p, h in routes]

    async def on_startup(_: web.Application) -> None:
        app["memory"] = asyncio.ensure_future(memory_once_loaded())

    app.on_startup.append(on_startup)
    app.router.add_get("/openapi.json", openapi)
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    return app


GROUP = {"joined": 0}  # the ranks that joined this head (a model across hosts)


async def serve_group(args: argparse.Namespace, failed: asyncio.Event) -> asyncio.Server:
    """The head's side of the group: every other rank connects and says hello; one that
    leaves fails the engine, as a dead worker fails vLLM's."""

    async def joined(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = (await reader.readline()).decode().strip()
        GROUP["joined"] += 1
        print(f"fake engine: {hello} joined ({GROUP['joined']} of {args.nnodes - 1})", flush=True)
        await reader.read()  # until it goes
        print(f"fake engine: {hello} left the group; the engine fails", file=sys.stderr, flush=True)
        failed.set()

    return await asyncio.start_server(joined, args.master_addr, args.master_port)


def run_headless(args: argparse.Namespace) -> None:
    """A headless rank (vLLM's run_headless): join the head, and end when it does."""
    where = f"{args.master_addr}:{args.master_port}"
    print(f"fake engine: rank {args.node_rank} of {args.model} joining {where}", flush=True)

    async def run() -> int:
        deadline = time.monotonic() + 300
        while True:
            try:
                reader, writer = await asyncio.open_connection(args.master_addr, args.master_port)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    print(f"fake engine: the head never answered: {exc}", file=sys.stderr, flush=True)
                    return 1
                await asyncio.sleep(0.2)
        writer.write(f"rank {args.node_rank}\n".encode())
        await writer.drain()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        gone = asyncio.ensure_future(reader.read())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([gone, stopping], return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            return 0
        print("fake engine: the head is gone; this rank fails", file=sys.stderr, flush=True)
        return 1

    sys.exit(asyncio.run(run()))


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    where = args.uds or f"{args.host}:{args.port}"
    print(f"fake engine for {args.model} on {where}", flush=True)
    if args.fail == "exit-on-start":
        time.sleep(args.load_delay)  # as an engine that fails after loading for a while
        print("fake engine: failing on purpose (exit-on-start)", file=sys.stderr, flush=True)
        sys.exit(3)
    try:
        # As vLLM does first: read the model's config (a directory it cannot read fails the start).
        with open(os.path.join(args.model, "config.json")) as f:
            json.load(f)
    except (OSError, ValueError) as exc:
        print(f"fake engine: Invalid repository ID or local directory specified: {args.model} ({exc})", flush=True)
        sys.exit(1)
    try:
        import uvloop  # as vLLM's server runs (uvicorn's default)
    except ImportError:
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))


async def serve(args: argparse.Namespace) -> None:
    """Like vLLM's --shutdown-timeout: on SIGTERM, stop accepting and let
    in-flight requests finish for that long."""
    runner = web.AppRunner(make_app(args), access_log=None, shutdown_timeout=args.shutdown_timeout)
    await runner.setup()
    sites: list[web.BaseSite] = []
    if args.uds:
        sites.append(web.UnixSite(runner, args.uds, backlog=args.backlog))
        if args.also_port:
            sites.append(web.TCPSite(runner, "127.0.0.1", args.also_port, backlog=args.backlog))
    else:
        sites.append(web.TCPSite(runner, args.host, args.port, backlog=args.backlog))
    failed = asyncio.Event()
    group = await serve_group(args, failed) if args.nnodes > 1 else None
    for site in sites:
        await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ended = asyncio.ensure_future(failed.wait())
    await asyncio.wait([asyncio.ensure_future(stop.wait()), ended], return_when=asyncio.FIRST_COMPLETED)
    if group is not None:
        group.close()
    await runner.cleanup()
    if failed.is_set():
        sys.exit(1)


if __name__ == "__main__":
    main()
