"""The public port's protocol against hostile clients: silent and trickling
connections, oversized and over-numerous headers, and too many connections from
one address. A real uvicorn server on loopback, with small limits."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn

from ssw.config import LimitSettings
from ssw.gateway.edge import edge_protocol

LIMITS = LimitSettings(
    header_timeout_s=0.5,
    max_header_bytes=4096,
    max_headers=20,
    max_connections=64,
    max_connections_per_client=4,
)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, Any]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    protocol, books = edge_protocol(LIMITS)
    config = uvicorn.Config(app, http=protocol, lifespan="off", log_config=None, access_log=False, timeout_keep_alive=5)  # type: ignore[arg-type]
    srv = uvicorn.Server(config)
    task = asyncio.create_task(srv.serve(sockets=[sock]))
    while not srv.started:  # noqa: ASYNC110 (uvicorn's Server offers no event for it)
        await asyncio.sleep(0.01)
    yield sock.getsockname()[1], books
    srv.should_exit = True
    await task


async def read_all(reader: asyncio.StreamReader, timeout: float = 5) -> bytes:
    async with asyncio.timeout(timeout):
        return await reader.read()


async def test_a_silent_connection_is_closed_at_the_header_deadline(server: tuple[int, Any]) -> None:
    port, books = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    assert await read_all(reader) == b""  # closed, with nothing said: it said nothing either
    assert 0.4 < time.monotonic() - t0 < 2
    assert books.timed_out == 1
    writer.close()


async def test_trickling_headers_get_408_at_the_deadline_however_slow(server: tuple[int, Any]) -> None:
    port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)

    dripping = asyncio.create_task(trickle())
    answer = await read_all(reader)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in answer
    assert time.monotonic() - t0 < 2
    dripping.cancel()
    writer.close()


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000,  # one value, never ended
        b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(40)) + b"\r\n",
    ],
)
async def test_headers_past_the_cap_get_431_without_being_read(server: tuple[int, Any], head: bytes) -> None:
    port, books = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    with contextlib.suppress(ConnectionError):
        writer.write(head)
        await writer.drain()
    # The answer arrives whole, though the client was still sending (a lingering close).
    answer = await read_all(reader)
    assert answer.startswith(b"HTTP/1.1 431 ") and b"headers_too_large" in answer
    assert books.too_large == 1
    assert time.monotonic() - t0 < LIMITS.header_timeout_s  # refused as they came, not at the deadline
    writer.close()


async def test_connections_past_the_per_client_limit_are_refused_and_others_served(server: tuple[int, Any]) -> None:
    port, books = server
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(LIMITS.max_connections_per_client)]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = await read_all(reader)
    assert answer.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in answer
    assert books.refused == 1
    # Another address is served all the while.
    other_r, other_w = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
    other_w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        assert (await other_r.readuntil(b"ok")).startswith(b"HTTP/1.1 200 ")
    for _, w in [*held, (reader, writer), (other_r, other_w)]:
        w.close()
    # Once they are gone, the address may connect again.
    await asyncio.sleep(0.1)
    assert books.per_client.get("127.0.0.1", 0) == 0
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        assert (await r.readuntil(b"ok")).startswith(b"HTTP/1.1 200 ")
    w.close()


async def test_a_kept_alive_connection_idles_past_the_header_deadline_but_its_next_headers_do_not(
    server: tuple[int, Any],
) -> None:
    port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(5):
        await reader.readuntil(b"ok")
    await asyncio.sleep(1.0)  # idle twice the header deadline: keep-alive (5 s) holds it
    writer.write(b"GET / HTTP/1.1\r\n")  # the next request begins, and stalls
    t0 = time.monotonic()
    answer = await read_all(reader)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - t0 < 2
    writer.close()


async def test_a_body_in_the_same_read_as_the_headers_is_not_counted_as_headers(server: tuple[int, Any]) -> None:
    port, books = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = b"x" * 60_000  # far past max_header_bytes, in one write with the headers
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    async with asyncio.timeout(5):
        assert (await reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200 ")
    assert books.too_large == 0
    writer.close()
