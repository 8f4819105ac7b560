"""The gateway's channel to the loader, against a stub loader: frames of any
size, frames that do not parse, streams that end, and a restarted loader."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from ssw.common.contract import LoadView, ModelView, Snapshot, WorkerView
from ssw.common.states import LoadState, WorkerState
from ssw.config import Config
from ssw.gateway.handler import Gateway
from ssw.gateway.loader_client import LoaderClient
from ssw.gateway.relay import Reply

# The rest of a /status answer, as a loader with one simulated GPU would give it.
STATUS_BASE: dict[str, Any] = {
    "ssw_version": "test",
    "uptime_s": 1.0,
    "gpu_source": "simulated",
    "placement_policy": "pack",
    "evictions_total": 0,
    "aliases": {},
    "missing": {},
    "gpus": [
        {
            "index": 0,
            "uuid": "SIM-0",
            "name": "Simulated GPU",
            "simulated": True,
            "memory_total_bytes": 48 * 10**9,
            "memory_used_bytes": 0,
            "memory_reserved_bytes": 0,
            "memory_releasing_bytes": 0,
            "memory_free_bytes": 48 * 10**9,
            "utilization_pct": None,
            "temperature_c": None,
            "power_w": None,
            "workers": [],
        }
    ],
}
STATUS_MODEL: dict[str, Any] = {
    "path": "/m",
    "weight_bytes": 1,
    "vram_need_bytes": 2 * 10**9,
    "vram_need_source": "models.yaml",
    "measured_vram_bytes": None,
    "unit": "ssw-worker@m.service",
}


class StubLoader:
    """Publishes its latest snapshot to every connection, as the loader does, and
    marks a model loading when asked to load it."""

    def __init__(self) -> None:
        self.models: dict[str, ModelView] = {}
        self.workers: list[WorkerView] = []
        self.loads: list[str] = []
        self.epoch = uuid.uuid4().hex
        self.seq = 0
        self.connections = 0
        self.latest = b""
        self.changed = asyncio.Condition()
        self.ended = 0  # bumped to end every open stream
        self.status_reads = 0
        self.status_body: bytes | None = None
        self.events_log: list[dict[str, Any]] = []

    async def publish(self, frame: bytes | None = None) -> None:
        self.seq += 1
        snap = Snapshot(epoch=self.epoch, seq=self.seq, models=self.models, aliases={}, workers=self.workers)
        self.latest = frame or b"event: snapshot\ndata: " + snap.model_dump_json().encode() + b"\n\n"
        async with self.changed:
            self.changed.notify_all()

    async def restart(self) -> None:
        """A new loader: a new epoch, counting from 0, knowing no load."""
        self.epoch, self.seq = uuid.uuid4().hex, 0
        self.models = {name: ModelView() for name in self.models}
        await self.publish()

    async def end_streams(self) -> None:
        self.ended += 1
        async with self.changed:
            self.changed.notify_all()

    async def events(self, request: web.Request) -> web.StreamResponse:
        self.connections += 1
        ended = self.ended
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        sent = b""
        while self.ended == ended:
            if self.latest and self.latest is not sent:
                sent = self.latest
                await resp.write(sent)
            async with self.changed:
                await self.changed.wait()
        return resp

    async def load(self, request: web.Request) -> web.Response:
        model = (await request.json())["model"]
        self.loads.append(model)
        # What it measured of the model (its load time) stays: only the load record changes.
        self.models[model] = self.models.get(model, ModelView()).model_copy(
            update={"load": LoadView(state=LoadState.LOADING, reason="requested")}
        )
        await self.publish()
        view = self.models[model].load.model_dump(mode="json")
        return web.json_response({"model": model, "load": view, "epoch": self.epoch, "seq": self.seq}, status=202)

    async def usage(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def status(self, request: web.Request) -> web.Response:
        """What GET /status answers (the status page reads it); ``status_body`` overrides."""
        self.status_reads += 1
        if self.status_body is not None:
            return web.Response(body=self.status_body, content_type="application/json")
        models = {n: {**m.model_dump(mode="json"), **STATUS_MODEL} for n, m in self.models.items()}
        body = {
            **STATUS_BASE,
            "epoch": self.epoch,
            "seq": self.seq,
            "models": models,
            "workers": [w.model_dump(mode="json") for w in self.workers],
            "events": self.events_log,
        }
        return web.json_response(body)


@contextlib.asynccontextmanager
async def serve(loader: StubLoader) -> AsyncIterator[str]:
    """The stub loader's admin API on a port of its own; its URL."""
    app = web.Application()
    app.router.add_get("/events", loader.events)
    app.router.add_post("/load", loader.load)
    app.router.add_post("/usage", loader.usage)
    app.router.add_get("/status", loader.status)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await loader.end_streams()
        await runner.cleanup()


@contextlib.asynccontextmanager
async def client(url: str) -> AsyncIterator[LoaderClient]:
    async with aiohttp.ClientSession() as session:
        c = LoaderClient(url, session)
        c.start()
        try:
            yield c
        finally:
            await c.close()


async def until(predicate: Any, timeout: float = 10.0) -> None:
    """Poll a condition, as tests.harness.stack.wait_for does outside an event loop."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - the conditions are plain attributes, not events
            await asyncio.sleep(0.01)


async def test_a_snapshot_of_two_thousand_models_arrives_whole(stub: tuple[StubLoader, str]) -> None:
    loader, url = stub
    loader.models = {f"model-{i:04d}": ModelView(aliases=[f"alias-{i:04d}"]) for i in range(2000)}
    await loader.publish()
    assert len(loader.latest) > 512 * 1024  # past the line limit that used to kill the channel
    async with client(url) as c:
        await until(lambda: c.snapshot is not None)
        assert c.snapshot is not None and len(c.snapshot.models) == 2000 and c.connected


async def test_a_frame_that_does_not_parse_costs_a_reconnect_not_the_channel(stub: tuple[StubLoader, str]) -> None:
    loader, url = stub
    await loader.publish(b"event: snapshot\ndata: {not json\n\n")
    async with client(url) as c:
        await until(lambda: c.last_error is not None)
        assert not c.connected and "contract version 1" in (c.last_error or "")
        loader.models = {"m": ModelView()}
        await loader.publish()
        await until(lambda: c.connected)
        assert c.snapshot is not None and set(c.snapshot.models) == {"m"} and loader.connections >= 2


async def test_a_stream_that_ends_is_followed_again(stub: tuple[StubLoader, str]) -> None:
    loader, url = stub
    loader.models = {"m": ModelView()}
    await loader.publish()
    async with client(url) as c:
        await until(lambda: c.connected)
        await loader.end_streams()
        await until(lambda: not c.connected)
        await until(lambda: c.connected)
        assert loader.connections == 2


async def test_a_restarted_loader_is_asked_again_for_the_load_its_waiters_need(stub: tuple[StubLoader, str]) -> None:
    loader, url = stub
    loader.models = {"m": ModelView()}
    await loader.publish()
    async with client(url) as c:
        gw = Gateway(Config(), c)
        await until(lambda: c.connected)

        async def send(message: Any) -> None:
            raise AssertionError("nothing is sent while a plain request waits")

        waiting = asyncio.ensure_future(gw.availability.workers_for("m", "wait", "interactive", Reply(send), False))
        await until(lambda: loader.loads == ["m"] and gw.queue.depth("m") == 1)
        # The loader dies with the load; the new one (a new epoch, its seq from 0) knows nothing of it.
        await loader.restart()
        await until(lambda: loader.loads == ["m", "m"])
        assert not waiting.done()  # still waiting: not failed by the new loader's low seq
        ready = WorkerView(
            unit="ssw-worker@m.service", model="m", replica=1, state=WorkerState.READY, gpus=[0], socket="/s"
        )
        loader.workers = [ready]
        await loader.publish()
        workers = await asyncio.wait_for(waiting, 5)
        assert [w.unit for w in workers] == ["ssw-worker@m.service"]
        await gw.close()
