"""The public port's HTTP protocol: uvicorn's httptools protocol with the limits
a port open to a whole studio network needs before any request reaches the app.

uvicorn arms no timer until a first response (a silent or trickling connection
stays open for ever), and buffers every header before the app can refuse them
(httptools joins a value split over reads with ``bytes +=``: quadratic CPU).
This protocol, per connection:

- refuses it at once (503, closed) beyond ``limits.max_connections`` open
  connections or ``limits.max_connections_per_client`` from one address;
- closes it (408) when a request's headers are not complete within
  ``limits.header_timeout_s`` of the connection opening or of the first byte
  of a kept-alive connection's next request: however slowly they trickle
  (idle between requests, uvicorn's keep-alive timer closes it). One sweep
  over the open connections checks the deadlines, a few times per timeout;
- counts header bytes as they arrive and answers 431 as soon as they pass
  ``limits.max_header_bytes`` or ``limits.max_headers``, without feeding the
  parser another byte.

Body reads get their deadline and size cap in the app (Admission.read_body,
GatewayApp), where the route is known. Counts are per gateway process.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ssw.config import LimitSettings

log = logging.getLogger(__name__)
LINGER_S = 2.0  # after a refusal, how long the client's unread bytes are drained


def _refusal(status: int, reason: bytes, message: str, code: str) -> bytes:
    body = orjson.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code, "source": "ssw"}}
    )
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        % (status, reason, len(body))
        + body
    )


class _Books:
    """Open connections, per client address, shared by the protocols of one listener;
    and the sweep that closes those whose headers are late."""

    def __init__(self) -> None:
        self.per_client: Counter[str] = Counter()
        self.open: set[Any] = set()  # the protocols of the counted connections
        self.refused = 0  # connections refused for a connection limit
        self.timed_out = 0  # connections closed for headers that did not arrive in time
        self.too_large = 0  # requests refused for their headers' size or count
        self.sweeping: asyncio.TimerHandle | None = None

    @property
    def total(self) -> int:
        return len(self.open)


def edge_protocol(limits: LimitSettings) -> tuple[type[asyncio.Protocol], _Books]:
    """A protocol class for uvicorn's ``http=`` that enforces ``limits``, and its books."""
    books = _Books()
    header_timeout = limits.header_timeout_s
    # Deadlines are checked by one sweep over the open connections, not by a timer per
    # request: a request then costs a float store (measured: bench/README.md, "edge").
    sweep_every = min(max(header_timeout / 8, 0.05), 1.0)
    max_bytes = limits.max_header_bytes
    max_headers = limits.max_headers
    max_total = limits.max_connections
    max_per_client = limits.max_connections_per_client
    too_large = _refusal(
        431,
        b"Request Header Fields Too Large",
        f"request headers exceed {max_bytes} bytes or {max_headers} fields",
        "headers_too_large",
    )
    too_slow = _refusal(
        408, b"Request Timeout", f"the request headers did not arrive within {header_timeout:g} s", "request_timeout"
    )
    too_many = _refusal(503, b"Service Unavailable", "too many connections; retry shortly", "too_many_connections")

    def sweep(loop: asyncio.AbstractEventLoop) -> None:
        books.sweeping = None
        late = loop.time() - header_timeout
        for proto in [p for p in books.open if p._ssw_head_since is not None and p._ssw_head_since <= late]:
            proto._ssw_expired()
        if books.open:
            books.sweeping = loop.call_later(sweep_every, sweep, loop)

    class EdgeProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._ssw_peer = ""
            self._ssw_counted = False
            self._ssw_in_head = True  # reading a request's headers
            self._ssw_head_bytes = 0  # raw bytes read while the headers are incomplete
            # When the headers being read began (loop time); None: not reading headers.
            self._ssw_head_since: float | None = None
            self._ssw_refused = False
            self._ssw_linger: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._ssw_peer = self.client[0] if self.client else ""
            if books.total >= max_total or books.per_client[self._ssw_peer] >= max_per_client:
                books.refused += 1
                transport.write(too_many)
                transport.close()
                return
            self._ssw_counted = True
            books.open.add(self)
            books.per_client[self._ssw_peer] += 1
            self._ssw_head_since = self.loop.time()
            if books.sweeping is None:
                books.sweeping = self.loop.call_later(sweep_every, sweep, self.loop)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._ssw_linger is not None:
                self._ssw_linger.cancel()
            if self._ssw_counted:
                self._ssw_counted = False
                books.open.discard(self)
                books.per_client[self._ssw_peer] -= 1
                if books.per_client[self._ssw_peer] <= 0:
                    del books.per_client[self._ssw_peer]
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._ssw_refused or self.transport.is_closing():
                return  # lingering after a refusal: what still comes is dropped unread
            if self._ssw_in_head:
                self._ssw_head_bytes += len(data)
                if self._ssw_head_since is None:
                    self._ssw_head_since = self.loop.time()  # a kept-alive connection's next request
            super().data_received(data)
            if self._ssw_in_head and not self._ssw_refused and self._ssw_head_bytes > max_bytes:
                # Still no end of the headers, and past the cap: not another byte is parsed
                # (httptools joins a value split over reads with bytes +=).
                books.too_large += 1
                self._ssw_refuse(too_large)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._ssw_in_head = True

        def on_headers_complete(self) -> None:
            # The raw count may hold body bytes of the same read: then the parsed fields decide.
            if len(self.headers) > max_headers or (
                self._ssw_head_bytes > max_bytes
                and len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers) > max_bytes
            ):
                books.too_large += 1
                self._ssw_refuse(too_large)
                return
            self._ssw_in_head = False
            self._ssw_head_bytes = 0
            self._ssw_head_since = None
            super().on_headers_complete()

        def _ssw_fields(self) -> int:
            """The bytes of the request target and the header fields, as parsed."""
            return len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)  # ": " and CRLF

        def on_body(self, body: bytes) -> None:
            if not self._ssw_refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self._ssw_refused:  # refused: no request to complete
                super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # Idle, uvicorn's keep-alive timer runs; from the next request's first byte
            # (which stops that timer) its headers get the same deadline as the first's.
            self._ssw_in_head = True
            self._ssw_head_bytes = 0

        def _ssw_expired(self) -> None:
            self._ssw_head_since = None
            if self._ssw_in_head and not self._ssw_refused and not self.transport.is_closing():
                books.timed_out += 1
                # A connection that never sent a byte gets no answer: it may be a
                # browser's speculative one.
                self._ssw_refuse(too_slow if self._ssw_head_bytes else b"")

        def _ssw_refuse(self, answer: bytes) -> None:
            """Answer and close. Closing a socket with unread bytes makes the kernel reset
            the connection, which can destroy the answer on its way: so the write side is
            shut after the answer, and what still arrives is dropped unread for a moment
            (nginx's lingering close) before the connection is closed."""
            self._ssw_refused = True
            self._ssw_head_since = None
            if not answer or not self.transport.can_write_eof():
                self.transport.close()
                return
            self.transport.write(answer)
            self.transport.write_eof()
            self._ssw_linger = self.loop.call_later(LINGER_S, self.transport.close)

    return EdgeProtocol, books
