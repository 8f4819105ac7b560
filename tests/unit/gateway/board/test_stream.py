"""The status page's frames, against a stub loader: what a frame holds, one frame per
change however many pages watch, and a frame that says so when the loader is away or
answers what it should not."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from ssw.common.contract import GpuView, HostRecord, LoadProgress, LoadView, ModelView, WorkerView
from ssw.common.states import LoadState, WorkerState
from ssw.config import Config
from ssw.gateway import loader_client
from ssw.gateway.board.stream import Board
from ssw.gateway.handler import Gateway
from ssw.gateway.loader_client import LoaderClient
from tests.unit.gateway.test_loader_client import STATUS_BASE, StubLoader, client, until


def loading(started: float) -> ModelView:
    progress = LoadProgress(kind="load", phase="engine_ready", started=started, expected_s=20.0)
    return ModelView(load=LoadView(state=LoadState.LOADING, reason="requested", progress=progress))


@contextlib.asynccontextmanager
async def following(url: str) -> AsyncIterator[Gateway]:
    """A gateway that follows the stub loader (its first snapshot in), closed after."""
    async with client(url) as c:
        gw = Gateway(Config(), c)
        await until(lambda: c.snapshot is not None)
        try:
            yield gw
        finally:
            await gw.close()


async def next_frame(frames: object) -> dict[str, object]:
    """The next frame of a viewer's stream (skipping its retry line and keep-alives)."""
    while True:
        chunk: bytes = await asyncio.wait_for(frames.__anext__(), 5)  # type: ignore[attr-defined]
        if chunk.startswith(b"event: frame\n"):
            return orjson.loads(chunk.split(b"data: ", 1)[1])  # type: ignore[no-any-return]


async def test_a_frame_holds_the_host_and_a_loads_progress_and_eta(stub: tuple[StubLoader, str]) -> None:
    loader, url = stub
    loader.models = {"m": loading(time.time() - 5)}
    loader.events_log = [{"at": time.time(), "kind": "loading", "model": "m", "unit": None, "text": "model m: load"}]
    await loader.publish()
    async with following(url) as gw:
        frame = await Board(gw).frame()
        status = frame["status"]
        assert isinstance(status, dict) and frame["loader"] == {"connected": True, "error": None}
        progress = status["models"]["m"]["progress"]
        assert progress["phase"] == "engine_ready" and 4.5 <= progress["elapsed_s"] <= 7
        assert 13 <= progress["eta_s"] <= 15.5 and progress["expected_s"] == 20.0
        assert status["events"][0]["kind"] == "loading" and status["gpus"][0]["memory_free_bytes"] == 48 * 10**9
        assert frame["waiting"] == {} and frame["in_flight"] == {} and "series" in frame["charts"]  # type: ignore[operator]


async def test_one_frame_per_change_however_many_viewers(stub: tuple[StubLoader, str]) -> None:
    loader, url = stub
    loader.models = {"m": ModelView()}
    await loader.publish()
    async with following(url) as gw:
        board = Board(gw)
        viewers = [board.stream() for _ in range(5)]
        firsts = [await next_frame(v) for v in viewers]
        assert len({f["at"] for f in firsts}) == 1 and board.frames_built == 1  # one build for five pages
        reads = loader.status_reads
        loader.models = {"m": loading(time.time())}
        await loader.publish()
        changed = [await next_frame(v) for v in viewers]
        assert all(f["status"]["models"]["m"]["progress"] is not None for f in changed)  # type: ignore[index]
        assert loader.status_reads - reads <= 2  # the loader is asked per frame, not per page
        for v in viewers:
            await v.aclose()  # type: ignore[attr-defined]
        await board.close()


async def test_the_loader_away_or_lying_is_said_not_fatal(stub: tuple[StubLoader, str]) -> None:
    loader, url = stub
    await loader.publish()
    async with following(url) as gw:
        board = Board(gw)
        loader.status_body = b'{"not": "a status"}'
        frame = await board.frame()
        assert frame["status"] is None and "did not match the contract" in frame["loader"]["error"]  # type: ignore[index]
        loader.status_body = b"[" * 100  # not JSON at all
        assert (await board.frame())["status"] is None
    # Nobody there: the page still gets a frame that says so.
    async with aiohttp.ClientSession() as session:
        away = LoaderClient("http://127.0.0.1:9", session)
        gw = Gateway(Config(), away)
        frame = await Board(gw).frame()
        assert frame["status"] is None and "cannot be read" in frame["loader"]["error"]  # type: ignore[index]
        await gw.close()


async def test_a_status_too_large_is_refused(stub: tuple[StubLoader, str], monkeypatch: pytest.MonkeyPatch) -> None:
    loader, url = stub
    await loader.publish()
    monkeypatch.setattr(loader_client, "MAX_STATUS_BYTES", 1000)
    loader.models = {f"m{i}": ModelView() for i in range(20)}
    async with client(url) as c:
        gw = Gateway(Config(), c)
        frame = await Board(gw).frame()
        assert frame["status"] is None and "exceeds 1000 bytes" in frame["loader"]["error"]  # type: ignore[index]
        await gw.close()


async def test_open_pages_end_their_streams_when_the_gateway_stops(stub: tuple[StubLoader, str]) -> None:
    loader, url = stub
    await loader.publish()
    async with following(url) as gw:
        board = Board(gw)
        page = board.stream()
        await next_frame(page)
        board.closing.set()
        with pytest.raises(StopAsyncIteration):
            while True:  # what is left, then the end: no grace period held by an open page
                await asyncio.wait_for(page.__anext__(), 2)
        await board.close()


class FleetStub:
    """What the frame reads of a fleet: this host, its peers' records, who answers."""

    def __init__(self, hosts: dict[str, HostRecord], unreachable: set[str]) -> None:
        self.host, self.connected, self.hosts, self._down = "a", True, hosts, unreachable

    def reachable(self, host: str) -> bool:
        return host not in self._down


async def test_in_a_fleet_the_frame_lists_every_host_and_who_answers(stub: tuple[StubLoader, str]) -> None:
    loader, url = stub
    await loader.publish()
    gpu = GpuView.model_validate(STATUS_BASE["gpus"][0])
    ready = WorkerView(unit="ssw-worker@m.service", model="m", replica=1, state=WorkerState.READY, gpus=[0], socket="")

    def record(name: str, workers: list[WorkerView]) -> HostRecord:
        return HostRecord(
            host=name, url="", epoch="e", at=time.time(), gpus=[gpu], models={}, aliases={}, workers=workers
        )

    async with client(url) as c:
        gw = Gateway(Config(), c)
        gw.fleet = FleetStub({"a": record("a", [ready]), "b": record("b", [])}, {"b"})  # type: ignore[assignment]
        frame = await Board(gw).frame()
        fleet = frame["fleet"]
        assert frame["host"] == "a" and isinstance(fleet, dict)
        assert fleet["hosts"]["a"]["ready"] == ["m"] and fleet["hosts"]["a"]["reachable"] is True
        assert fleet["hosts"]["b"]["reachable"] is False and fleet["hosts"]["b"]["free_bytes"] == 48 * 10**9
        gw.fleet = None
        await gw.close()
