"""The status page's data, live: while anyone watches, one task per gateway process
builds a frame whenever the loader's snapshot changes (at most every MIN_GAP_S) and
at least every TICK_S (GPU figures, charts), and every viewer gets the latest frame.
However many pages are open, the loader is asked once per frame: no polling storm.

A frame is one JSON object: the loader's status (GPUs, workers, models with their
load's progress, recent events), what waits here per model and priority, what is in
flight per worker, the charts' series, the batch tier's work and the fleet's hosts.
When the loader is away, the frame says so and the page shows it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from ssw.common import tasks
from ssw.common.contract import Snapshot
from ssw.common.sse import until_closed
from ssw.errors import LoaderUnavailable
from ssw.gateway.board.series import Series

if TYPE_CHECKING:
    from ssw.gateway.handler import Gateway

log = logging.getLogger(__name__)
MIN_GAP_S = 0.2  # a burst of changes is one frame
TICK_S = 2.0
KEEPALIVE_S = 15.0
SOURCE_TIMEOUT_S = 3.0


class Board:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.series = Series()
        # Other parts of ssw add what they show (the batch tier: its batches and jobs).
        self.sources: dict[str, Callable[[], Awaitable[Any]]] = {}
        self._viewers: set[asyncio.Queue[bytes]] = set()
        self._changed = asyncio.Event()
        # Set when the gateway stops: open pages end their streams (and reconnect to the
        # next gateway) instead of holding its shutdown for its grace period.
        self.closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._latest: bytes | None = None  # the last frame, while anyone watches
        self.frames_built = 0
        gw.loader.on_snapshot(self._on_snapshot)

    def _on_snapshot(self, snap: Snapshot, restarted: bool) -> None:
        self._changed.set()

    async def close(self) -> None:
        await tasks.cancel(self._task)

    async def stream(self) -> AsyncIterator[bytes]:
        """One viewer's server-sent events: the latest frame each time there is a new one."""
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1)
        self._viewers.add(queue)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        if self._latest is not None:
            queue.put_nowait(self._latest)  # at most TICK_S old: a page that reconnects costs no build
        else:
            self._changed.set()
        try:
            yield b"retry: 2000\n\n"
            async for chunk in until_closed(queue, _event, self.closing, KEEPALIVE_S):
                yield chunk
        finally:
            self._viewers.discard(queue)

    async def _run(self) -> None:
        try:
            await self._frames()
        finally:
            self._latest = None  # nobody watched: the next page starts from a fresh frame

    async def _frames(self) -> None:
        while self._viewers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), TICK_S)
            self._changed.clear()
            try:
                frame = orjson.dumps(await self.frame(), option=orjson.OPT_NON_STR_KEYS)
            except Exception:  # a bad frame must not end the page for everyone
                log.exception("status page: building a frame failed")
                await asyncio.sleep(TICK_S)
                continue
            self.frames_built += 1
            self._latest = frame
            for queue in list(self._viewers):
                if queue.full():  # a slow viewer skips to the latest
                    with contextlib.suppress(asyncio.QueueEmpty):
                        queue.get_nowait()
                queue.put_nowait(frame)
            await asyncio.sleep(MIN_GAP_S)

    async def frame(self) -> dict[str, Any]:
        gw = self.gw
        now = time.time()
        out: dict[str, Any] = {
            "at": round(now, 3),
            "host": gw.fleet.host if gw.fleet is not None else socket.gethostname(),
            "loader": {"connected": gw.loader.connected, "error": gw.loader.last_error},
            "waiting": {m: {p: n for p, n in gw.queue.depth_by_priority(m).items() if n} for m in gw.queue.models()},
            "in_flight": gw.relay.inflight.demand(),
            "charts": self.series.view(now),
        }
        try:
            status = await gw.loader.status()
        except LoaderUnavailable as exc:
            out["loader"] = {"connected": False, "error": exc.message}
            out["status"] = None
        else:
            models = {}
            for name, m in status.models.items():
                progress = m.load.progress
                models[name] = {
                    "aliases": m.aliases,
                    "pinned": m.pinned,
                    "load": m.load.model_dump(mode="json", exclude={"progress"}),
                    "progress": progress.describe(now) if progress is not None else None,
                    "load_seconds": m.load_seconds,
                    "wake_seconds": m.wake_seconds,
                    "vram_need_bytes": m.vram_need_bytes,
                    "base": m.base,
                }
            out["status"] = {
                "uptime_s": status.uptime_s,
                "ssw_version": status.ssw_version,
                "gpu_source": status.gpu_source,
                "evictions_total": status.evictions_total,
                "gpus": [g.model_dump(mode="json") for g in status.gpus],
                "workers": [w.model_dump(mode="json", exclude={"load_marks", "socket"}) for w in status.workers],
                "models": models,
                "events": [e.model_dump(mode="json") for e in status.events],
                "missing": status.missing,
            }
        for name, source in self.sources.items():
            try:
                async with asyncio.timeout(SOURCE_TIMEOUT_S):
                    out[name] = await source()
            except Exception as exc:  # shown, not fatal: the rest of the page stands
                out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        if gw.fleet is not None:
            out["fleet"] = {
                "host": gw.fleet.host,
                "connected": gw.fleet.connected,
                "hosts": {
                    name: {
                        "at": r.at,
                        "reachable": name == gw.fleet.host or gw.fleet.reachable(name),
                        "gpus": len(r.gpus),
                        "free_bytes": sum(g.memory_free_bytes for g in r.gpus),
                        "ready": sorted({w.model for w in r.workers if w.state == "ready"}),
                    }
                    for name, r in sorted(gw.fleet.hosts.items())
                },
            }
        return out


def _event(frame: bytes) -> bytes:
    return b"event: frame\ndata: " + frame + b"\n\n"
