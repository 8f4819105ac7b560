"""HTTP/1.1 to workers over their unix sockets: a small client with a pool of
kept-alive connections per socket, on asyncio protocols and httptools (the
parser uvicorn uses).

The relay's hot path and the loader's probes both use it. It does only what
talking to a local vLLM needs: one request at a time per connection, bodies
known in full before sending, responses read whole or streamed chunk by
chunk with flow control, a connect timeout and a silence timeout. aiohttp's
client spent several times as much CPU per request here (bench/README.md).

Nothing a worker or a peer sends is trusted for size or time (:class:`Limits`):
response headers are capped in count and bytes while they arrive (httptools
buffers a header value until it ends, so the bytes are counted as they are
fed, not after), a body read whole is capped, and the headers must be complete
within a total deadline, so a peer that drips a byte at a time cannot hold a
request past it the way it defeats a silence timer.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httptools

HIGH_WATER = 256 * 1024  # buffered response bytes before the socket is paused
LOW_WATER = 64 * 1024
MAX_IDLE_PER_SOCKET = 512


@dataclass(frozen=True, slots=True)
class Limits:
    """What one response may be: exceeding any is a ResponseFailed of that request."""

    max_headers: int = 100
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = 4 * 2**20  # a body read whole (Response.read)
    headers_timeout_s: float | None = None  # from sending the request to the end of the response's headers


class UpstreamError(Exception):
    """The worker could not be talked to."""


class ConnectFailed(UpstreamError):
    """Nothing reached the worker: another worker may take the request."""


class BacklogFull(ConnectFailed):
    """The worker's listen backlog was full: it is alive, and may take the request a moment later."""


class ResponseFailed(UpstreamError):
    """The request was sent, and the connection failed or fell silent before the response was complete."""

    answered = False  # whether any byte of a response had come back


class NoAnswer(ResponseFailed):
    """The request was sent, and the worker went away (died, closed, fell silent)
    without a byte of answer: nothing of it can have reached anyone."""


class _Connection(asyncio.Protocol):
    __slots__ = (
        "_body",
        "_body_size",
        "_complete",
        "_error",
        "_head_bytes",
        "_head_timer",
        "_headers",
        "_headers_done",
        "_keep_alive",
        "_last_data",
        "_limits",
        "_loop",
        "_parser",
        "_paused",
        "_read_timeout",
        "_timer",
        "_waiter",
        "closed",
        "got_bytes",
        "pool_key",
        "status",
        "transport",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, key: str, read_timeout: float | None, limits: Limits) -> None:
        self._loop = loop
        self.pool_key = key
        self._read_timeout = read_timeout
        self._limits = limits
        self._head_timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser: httptools.HttpResponseParser | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._headers_done = False
        self._head_bytes = 0
        self._body: collections.deque[bytes] = collections.deque()
        self._body_size = 0
        self._complete = False
        self._keep_alive = False
        self._error: UpstreamError | None = None  # ConnectFailed or ResponseFailed
        self._paused = False
        self.got_bytes = False
        self._last_data = 0.0

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self._last_data = self._loop.time()
        if self._parser is None:
            self._fail(ResponseFailed("the worker sent data without a request"))
            return
        if not self._headers_done:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ResponseFailed(f"malformed response from the worker: {exc}"))
            return
        if not self._headers_done and self._head_bytes > self._limits.max_header_bytes:
            self._fail(ResponseFailed(f"response headers exceed {self._limits.max_header_bytes} bytes"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        if not self._complete and self._parser is not None:
            if isinstance(exc, OSError) and exc.errno in (errno.ENOTCONN, errno.EAGAIN) and not self.got_bytes:
                # Never connected (asyncio's loop reports a full backlog so): nothing was sent.
                self._fail(BacklogFull(f"cannot connect to {self.pool_key}: {exc.strerror}"))
            elif isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED and not self.got_bytes:
                self._fail(ConnectFailed(f"cannot connect to {self.pool_key}: {exc.strerror}"))
            elif not self.got_bytes:
                self._fail(NoAnswer(f"the worker closed the connection without answering ({exc or 'EOF'})"))
            else:
                self._fail(ResponseFailed(f"the worker closed the connection ({exc or 'EOF'})"))

    # --- httptools callbacks ------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self._headers) >= self._limits.max_headers:
            self._fail(ResponseFailed(f"more than {self._limits.max_headers} response headers"))
            self.abort()
            return
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self._parser is None:  # failed by a limit within this same chunk
            return
        self.status = self._parser.get_status_code()
        self._headers_done = True
        self._cancel_head_timer()
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._body_size += len(body)
        if self._body_size > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._parser is None:  # failed by a limit within this same chunk
            return
        self._keep_alive = self._parser.should_keep_alive()
        self._complete = True
        self._parser = None
        self._cancel_timer()
        self._wake()

    # --- used by Response and Pool ----------------------------------------------------------

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self._reset()
        self._parser = httptools.HttpResponseParser(self)
        if self.transport.is_closing():
            # Closed by the worker while idle, and not noticed yet: nothing is sent.
            self._fail(NoAnswer("the worker had closed this connection"))
            return
        self._last_data = self._loop.time()
        if self._read_timeout:
            self._timer = self._loop.call_later(self._read_timeout, self._check_silence)
        if self._limits.headers_timeout_s:
            self._head_timer = self._loop.call_later(self._limits.headers_timeout_s, self._head_deadline)
        self.transport.write(data)

    def _head_deadline(self) -> None:
        self._head_timer = None
        if not self._headers_done:
            self._fail(ResponseFailed(f"no complete response headers within {self._limits.headers_timeout_s:.0f} s"))
            self.abort()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _check_silence(self) -> None:
        assert self._read_timeout is not None
        quiet = self._loop.time() - self._last_data
        if quiet >= self._read_timeout:
            self._timer = None
            # Not retried elsewhere: another try would wait as long again.
            self._fail(ResponseFailed(f"the worker sent nothing for {self._read_timeout:.0f} s"))
            self.abort()
        else:
            self._timer = self._loop.call_later(self._read_timeout - quiet, self._check_silence)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._cancel_head_timer()

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        self._parser = None
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def headers(self) -> None:
        while not self._headers_done:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def next_chunk(self) -> bytes | None:
        """Body bytes as they arrive; None once the body is complete."""
        while True:
            if self._body:
                data = b"".join(self._body)
                self._body.clear()
                self._body_size = 0
                if self._paused and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return data
            if self._complete:
                return None
            if self._error is not None:
                raise self._error
            await self._wait()

    @property
    def reusable(self) -> bool:
        return self._complete and self._keep_alive and not self.closed and self._error is None

    def abort(self) -> None:
        self.closed = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()


class Response:
    """A worker's response: its status and headers at once, the body whole or as it arrives.
    Call release() (or close() to abandon it) when done."""

    __slots__ = ("_conn", "_pool", "headers", "status")

    def __init__(self, pool: Pool, conn: _Connection) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self.status = conn.status
        self.headers = conn._headers

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def read(self, max_bytes: int | None = None) -> bytes:
        """The whole body; ResponseFailed past ``max_bytes`` (default: the pool's limit)."""
        assert self._conn is not None
        limit = max_bytes or self._pool.limits.max_body_bytes
        parts = []
        size = 0
        while (chunk := await self._conn.next_chunk()) is not None:
            size += len(chunk)
            if size > limit:
                raise ResponseFailed(f"the response body exceeds {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        assert self._conn is not None
        conn = self._conn
        while (chunk := await conn.next_chunk()) is not None:
            yield chunk

    def release(self) -> None:
        """Give the connection back to the pool if the response was read to its end."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.reusable:
            self._pool._put(conn)
        else:
            conn.abort()

    def close(self) -> None:
        """Drop the connection: the worker sees the client go (vLLM aborts the request)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()


class Pool:
    """Kept-alive connections to workers, per socket path."""

    def __init__(self, connect_timeout: float, read_timeout: float | None, limits: Limits | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.limits = limits or Limits()
        self._idle: dict[str, list[_Connection]] = {}
        # For https:// upstreams (another host's gateway in a fleet); None: the system's CAs.
        self.ssl_context: ssl.SSLContext | None = None

    def _put(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.pool_key, [])
        if len(idle) < MAX_IDLE_PER_SOCKET:
            idle.append(conn)
        else:
            conn.abort()

    def _take(self, path: str) -> _Connection | None:
        idle = self._idle.get(path)
        while idle:
            conn = idle.pop()  # the most recently used: the likeliest to be alive
            if not conn.closed:
                return conn
        return None

    async def _connect(self, path: str) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                if path.startswith(("http://", "https://")):
                    # Another host's gateway (a fleet): the same protocol over TCP.
                    url = urllib.parse.urlsplit(path)
                    tls = url.scheme == "https"
                    _, proto = await loop.create_connection(
                        lambda: _Connection(loop, path, self.read_timeout, self.limits),
                        url.hostname or "",
                        url.port or (443 if tls else 80),
                        ssl=(self.ssl_context or ssl.create_default_context()) if tls else None,
                    )
                else:
                    _, proto = await loop.create_unix_connection(
                        lambda: _Connection(loop, path, self.read_timeout, self.limits), path
                    )
        except TimeoutError:
            raise ConnectFailed(f"connecting to {path} timed out after {self.connect_timeout:.1f} s") from None
        except BlockingIOError as exc:
            raise BacklogFull(f"cannot connect to {path}: {exc.strerror or exc}") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {path}: {exc.strerror or exc}") from None
        return proto

    async def request(self, path: str, head: bytes, body: bytes = b"") -> Response:
        """Send one request (its request line and headers in ``head``, ending with an
        empty line) and return once the response's headers have arrived."""
        conn = self._take(path)
        if conn is not None:
            conn.send(head + body)
            try:
                await conn.headers()
                return Response(self, conn)
            except NoAnswer:
                # Most likely the worker closed this idle connection as the request
                # went out, and never saw it. Once more on a new connection.
                conn.abort()
            except BaseException:
                conn.abort()
                raise
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        pause = 0.002
        while True:
            try:
                conn = await self._connect(path)
                conn.send(head + body)
                await conn.headers()
                return Response(self, conn)
            except BacklogFull:
                # Hundreds of waiters released by one load fill a worker's backlog for a
                # moment: a unix socket then refuses at once where TCP would retry its
                # SYN. Nothing was sent; the worker is alive. Try again shortly.
                if conn is not None:
                    conn.abort()
                conn = None
                if loop.time() + pause > deadline:
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.05)
            except BaseException:
                if conn is not None:
                    conn.abort()
                raise

    def forget(self, path: str) -> None:
        """Close the idle connections to a worker that is gone."""
        for conn in self._idle.pop(path, []):
            conn.abort()

    async def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.abort()
        self._idle.clear()
        await asyncio.sleep(0)


def request_head(method: str, target: str, headers: dict[str, str] | None = None, body_length: int = 0) -> bytes:
    """The request line and headers of a request to a worker."""
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost"]
    if method != "GET" or body_length:
        lines.append(f"Content-Length: {body_length}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def fetch(
    pool: Pool, path: str, method: str, target: str, body: bytes = b"", **headers: str
) -> tuple[int, bytes]:
    """A whole small request (probes, control calls): status and body."""
    head = request_head(method, target, {k.replace("_", "-"): v for k, v in headers.items()}, len(body))
    resp = await pool.request(path, head, body)
    try:
        data = await resp.read()
    except BaseException:
        resp.close()
        raise
    resp.release()
    return resp.status, data
