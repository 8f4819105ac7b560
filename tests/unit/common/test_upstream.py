"""The client to workers' unix sockets, against real sockets and a real HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from ssw.common.upstream import ConnectFailed, Limits, NoAnswer, Pool, ResponseFailed, fetch, request_head


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[str]:
    async def small(request: web.Request) -> web.Response:
        return web.json_response({"echo": (await request.read()).decode()})

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(50):
            await resp.write(b"data: %d\n\n" % i)
        return resp

    async def silent(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response()

    app = web.Application()
    app.router.add_post("/small", small)
    app.router.add_get("/stream", stream)
    app.router.add_get("/silent", silent)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    path = str(tmp_path / "w.sock")
    site = web.UnixSite(runner, path)
    await site.start()
    yield path
    await runner.cleanup()


async def test_a_request_and_its_answer_over_a_kept_alive_connection(server: str) -> None:
    path = server
    pool = Pool(1.0, 5.0)
    for i in range(3):
        status, body = await fetch(pool, path, "POST", "/small", f"n{i}".encode())
        assert status == 200 and body == f'{{"echo": "n{i}"}}'.encode()
    assert len(pool._idle[path]) == 1  # one connection served all three
    await pool.close()


async def test_a_stream_arrives_whole_chunk_by_chunk(server: str) -> None:
    path = server
    pool = Pool(1.0, 5.0)
    resp = await pool.request(path, request_head("GET", "/stream"))
    assert resp.status == 200 and resp.header(b"content-type") == b"text/event-stream"
    data = b"".join([c async for c in resp.iter_chunks()])
    resp.release()
    assert data == b"".join(b"data: %d\n\n" % i for i in range(50))
    await pool.close()


async def test_nothing_listening_is_a_connect_failure(tmp_path: Path) -> None:
    pool = Pool(1.0, 5.0)
    with pytest.raises(ConnectFailed, match="No such file"):
        await fetch(pool, str(tmp_path / "none.sock"), "GET", "/health")
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on, as a dead worker leaves
    with pytest.raises(ConnectFailed, match="refused"):
        await fetch(pool, str(stale), "GET", "/health")


async def test_a_worker_that_closed_an_idle_connection_gets_the_request_on_a_new_one(
    server: str,
) -> None:
    path = server
    pool = Pool(1.0, 5.0)
    await fetch(pool, path, "POST", "/small", b"a")
    (conn,) = pool._idle[path]
    conn.closed = False  # as if the close had not been noticed yet
    assert conn.transport is not None
    conn.transport.close()
    await asyncio.sleep(0)
    conn.closed = False
    status, _ = await fetch(pool, path, "POST", "/small", b"b")
    assert status == 200
    await pool.close()


async def test_a_silent_worker_times_out(server: str) -> None:
    path = server
    pool = Pool(1.0, 0.3)
    with pytest.raises(ResponseFailed, match="sent nothing for 0 s"):
        await fetch(pool, path, "GET", "/silent")
    await pool.close()


async def test_a_full_backlog_is_a_connect_failure(tmp_path: Path) -> None:
    path = str(tmp_path / "busy.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(0)  # never accepts
    held = []
    for _ in range(3):
        c = socket.socket(socket.AF_UNIX)
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(path)
        held.append(c)
    with pytest.raises(ConnectFailed):
        await fetch(Pool(1.0, 5.0), path, "GET", "/health")
    for c in held:
        c.close()
    listener.close()
    os.unlink(path)


async def test_a_backlog_full_for_a_moment_is_waited_out(tmp_path: Path) -> None:
    # Hundreds of waiters released by one load fill a worker's backlog for a moment:
    # a unix socket refuses at once (EAGAIN) where TCP would retry, so the client does.
    path = str(tmp_path / "busy.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(0)
    held = []
    for _ in range(3):
        c = socket.socket(socket.AF_UNIX)
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(path)
        held.append(c)

    def serve_later() -> None:
        time.sleep(0.3)
        for c in held:
            c.close()
        while True:
            conn, _ = listener.accept()
            with conn:
                if conn.recv(65536):
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    return

    thread = threading.Thread(target=serve_later)
    thread.start()
    started = time.monotonic()
    status, body = await fetch(Pool(5.0, 5.0), path, "GET", "/health")
    assert (status, body) == (200, b"ok") and time.monotonic() - started >= 0.3
    thread.join()
    listener.close()


async def test_a_worker_that_dies_before_answering_is_no_answer(tmp_path: Path) -> None:
    path = str(tmp_path / "dies.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    listener.setblocking(False)

    async def die_on_request() -> None:
        conn, _ = await asyncio.get_running_loop().sock_accept(listener)
        await asyncio.get_running_loop().sock_recv(conn, 1024)
        conn.close()  # as a SIGKILLed worker's socket does

    dying = asyncio.ensure_future(die_on_request())
    with pytest.raises(NoAnswer):
        await fetch(Pool(1.0, 5.0), path, "POST", "/v1/completions", b"{}")
    await dying
    listener.close()


@pytest.fixture
async def hostile(tmp_path: Path) -> AsyncIterator[Callable[[bytes, float], Awaitable[str]]]:
    """Starts a worker that answers every request with the bytes given, one at a time
    every ``drip_s`` if that is set, and then stays connected."""
    servers: list[asyncio.Server] = []
    handlers: list[asyncio.Task[None]] = []

    async def start(answer: bytes, drip_s: float = 0.0) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            handlers.append(asyncio.current_task())  # type: ignore[arg-type]
            try:
                await reader.readuntil(b"\r\n\r\n")
                if drip_s:
                    for i in range(len(answer)):
                        writer.write(answer[i : i + 1])
                        await writer.drain()
                        await asyncio.sleep(drip_s)
                else:
                    writer.write(answer)
                    await writer.drain()
                await asyncio.sleep(30)
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        path = str(tmp_path / f"hostile-{len(servers)}.sock")
        servers.append(await asyncio.start_unix_server(serve, path))
        return path

    yield start
    for task in handlers:
        task.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)
    for server in servers:
        server.close()
        await server.wait_closed()


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize(
    ("answer", "limits", "why"),
    [
        (HEAD + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n", Limits(max_headers=50), "more than 50"),
        (HEAD + b"X-Big: " + b"a" * 2_000_000 + b"\r\n\r\n", Limits(max_header_bytes=65536), "exceed 65536 bytes"),
        (
            HEAD + b"Content-Length: 5000000\r\n\r\n" + b"x" * 5_000_000,
            Limits(max_body_bytes=1_000_000),
            "exceeds 1000000 bytes",
        ),
    ],
)
async def test_a_worker_answering_past_a_limit_fails_that_request(
    hostile: Callable[[bytes, float], Awaitable[str]], answer: bytes, limits: Limits, why: str
) -> None:
    path = await hostile(answer, 0.0)
    pool = Pool(1.0, 5.0, limits)
    with pytest.raises(ResponseFailed, match=why):
        await fetch(pool, path, "GET", "/x")
    assert not pool._idle.get(path)  # the connection is not kept
    await pool.close()


async def test_headers_dripped_slower_than_the_silence_timer_still_meet_the_deadline(
    hostile: Callable[[bytes, float], Awaitable[str]],
) -> None:
    # A byte every 0.1 s: the silence timer (0.5 s) never fires; the headers deadline does.
    path = await hostile(HEAD + b"X-Slow: " + b"a" * 1000 + b"\r\n\r\n", 0.1)
    pool = Pool(1.0, 0.5, Limits(headers_timeout_s=1.0))
    t0 = time.monotonic()
    with pytest.raises(ResponseFailed, match="no complete response headers within 1 s"):
        await pool.request(path, request_head("GET", "/x"))
    assert time.monotonic() - t0 < 2.5
    await pool.close()
