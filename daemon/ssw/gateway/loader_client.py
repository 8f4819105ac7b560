"""The gateway's side of the local channel to the loader: a pushed stream of
typed snapshots (:class:`ssw.common.contract.Snapshot`), load requests, and usage
reports for the loader's LRU eviction.

If the loader goes away, the last snapshot stays in force, so the gateway
keeps serving the workers it knows while the loader restarts. Whatever goes
wrong on the stream (the loader restarting, a frame of any size, a frame that
does not parse), the client reconnects; ``connected`` is true only while a
stream is open and its last frame was good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
from pydantic import ValidationError

from ssw.common import tasks
from ssw.common.auth import read_token
from ssw.common.contract import CONTRACT_VERSION, LoadAccepted, Snapshot, Status
from ssw.errors import LoaderUnavailable, LoadFailed, ModelNotFound, NoCapacity, SswError, WouldEvict
from ssw.gateway.inflight import InFlight

log = logging.getLogger(__name__)
USAGE_REPORT_INTERVAL_S = 2.0
# A change in the requests in flight is told within this (a burst of changes, once).
DEMAND_REPORT_DELAY_S = 0.1
MAX_FRAME_BYTES = 256 * 2**20  # a runaway stream is cut, not buffered forever
SILENCE_TIMEOUT_S = 60.0  # the loader sends a keep-alive every 15 s
STATUS_TIMEOUT_S = 5.0
MAX_STATUS_BYTES = 32 * 2**20


class LoaderClient:
    def __init__(self, url: str, session: aiohttp.ClientSession, token_file: Path | None = None) -> None:
        self.url = url.rstrip("/")
        self._session = session
        self._token_file = token_file
        self._token: str | None = None
        self.snapshot: Snapshot | None = None
        self.snapshot_at = 0.0  # monotonic time the last snapshot arrived
        self.connected = False
        self.last_error: str | None = None
        self.on_connection: Callable[[bool], None] | None = None  # told each time it connects or is lost
        self._updated = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_used: dict[str, float] = {}
        # unit -> adapter -> when it last served that adapter (for the loader's adapter LRU)
        self._adapters_used: dict[str, dict[str, float]] = {}
        self._interactive: dict[str, float] = {}  # unit -> its last request that was not batch work
        self._unsent: set[str] = set()
        # What this process has in flight on each worker (set by the gateway: the relay's
        # counts), told to the loader as the workers' demand; each process is one reporter.
        self.demand: InFlight | None = None
        self._reporter = str(os.getpid())
        self._demand_changed = asyncio.Event()
        self._demand_told = False  # whether the loader last heard of something in flight
        # Called with each new snapshot, and whether it comes from a loader that
        # was not the one before (a restart: its epoch differs).
        self._listeners: list[Callable[[Snapshot, bool], None]] = []

    @property
    def session(self) -> aiohttp.ClientSession:
        return self._session

    def auth_headers(self) -> dict[str, str]:
        return self._auth()

    def _auth(self) -> dict[str, str]:
        # Read lazily: the loader creates the token at its first start.
        if self._token is None and self._token_file is not None:
            self._token = read_token(self._token_file)
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def on_snapshot(self, listener: Callable[[Snapshot, bool], None]) -> None:
        self._listeners.append(listener)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._follow()), asyncio.create_task(self._report_usage())]

    async def close(self) -> None:
        await tasks.cancel(*self._tasks)

    # --- usage: when each worker last served, for the loader's LRU eviction ------

    def watch(self, demand: InFlight) -> None:
        self.demand = demand
        demand.on_change = self._demand_changed.set

    def used(self, unit: str, adapter: str | None = None, interactive: bool = True) -> None:
        now = time.time()
        self._last_used[unit] = now
        if interactive:
            self._interactive[unit] = now
        self._unsent.add(unit)
        if adapter is not None:
            self._adapters_used.setdefault(unit, {})[adapter] = now

    async def flush_usage(self) -> None:
        in_flight = self.demand.demand() if self.demand is not None else {}
        # Demand goes out while anything is in flight (the loader forgets a silent
        # reporter) and once more when it has all ended.
        tell = bool(in_flight) or self._demand_told
        if not self._unsent and not tell:
            return
        batch = {u: self._last_used[u] for u in self._unsent if u in self._last_used}
        adapters = {u: self._adapters_used[u] for u in batch if u in self._adapters_used}
        interactive = {u: self._interactive[u] for u in batch if u in self._interactive}
        report: dict[str, object] = {"last_used": batch, "adapters": adapters, "interactive": interactive}
        if self.demand is not None:
            report |= {"reporter": self._reporter, "in_flight": in_flight, "served": self.demand.served}
        self._unsent.clear()
        try:
            async with self._session.post(
                self.url + "/usage", json=report, headers=self._auth(), timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
                resp.raise_for_status()
            self._demand_told = bool(in_flight)
        except (aiohttp.ClientError, OSError, TimeoutError):
            self._unsent.update(batch)  # sent again with the next batch

    async def _report_usage(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._demand_changed.wait(), USAGE_REPORT_INTERVAL_S)
            if self._demand_changed.is_set():
                await asyncio.sleep(DEMAND_REPORT_DELAY_S)
                self._demand_changed.clear()
            await self.flush_usage()

    # --- the snapshot stream -------------------------------------------------------

    async def wait_update(self, timeout: float) -> None:
        """Until the next snapshot arrives (or the timeout passes)."""
        event = self._updated
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    async def first_snapshot(self, timeout: float) -> bool:
        """Until the loader's first snapshot is in (True) or ``timeout`` s pass (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            event = self._updated  # taken before the check: a snapshot published meanwhile sets it
            if self.snapshot is not None:
                return True
            left = deadline - loop.time()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), left)

    def _publish(self, snapshot: Snapshot) -> None:
        restarted = self.snapshot is not None and self.snapshot.epoch != snapshot.epoch
        if restarted:
            log.info("the loader restarted (epoch %s); asking again for what was pending", snapshot.epoch[:8])
        self.snapshot = snapshot
        self.snapshot_at = time.monotonic()
        event, self._updated = self._updated, asyncio.Event()
        event.set()
        for listener in self._listeners:
            try:
                listener(snapshot, restarted)
            except Exception:  # a listener's bug must not end the stream
                log.exception("snapshot listener failed")

    def _frame(self, frame: bytes) -> None:
        data = b"\n".join(line[5:].lstrip() for line in frame.split(b"\n") if line.startswith(b"data:"))
        if not data:
            return  # a comment (keep-alive) or an event without data
        snapshot = Snapshot.model_validate_json(data)
        self._publish(snapshot)

    async def _read_stream(self, resp: aiohttp.ClientResponse) -> None:
        pending = b""
        async for chunk in resp.content.iter_any():
            pending += chunk.replace(b"\r\n", b"\n")
            while (cut := pending.find(b"\n\n")) >= 0:
                frame, pending = pending[:cut], pending[cut + 2 :]
                self._frame(frame)
                if not self.connected:
                    self.connected = True
                    self.last_error = None
                    if self.on_connection is not None:
                        self.on_connection(True)
                    log.info(
                        "connected to the loader at %s (epoch %s)", self.url, self.snapshot and self.snapshot.epoch[:8]
                    )
            if len(pending) > MAX_FRAME_BYTES:
                raise ValueError(f"a snapshot frame exceeds {MAX_FRAME_BYTES} bytes")

    async def _follow(self) -> None:
        backoff = 0.2
        while True:
            try:
                timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=SILENCE_TIMEOUT_S)
                async with self._session.get(self.url + "/events", headers=self._auth(), timeout=timeout) as resp:
                    if resp.status == 401:
                        self._token = None  # re-read: the loader may have created a new one
                        raise PermissionError(f"the loader refused the gateway's token from {self._token_file}")
                    resp.raise_for_status()
                    # A restarted loader knows no usage: tell it all again.
                    self._unsent.update(self._last_used)
                    backoff = 0.2
                    await self._read_stream(resp)
                raise ConnectionResetError("the loader ended the stream")
            except asyncio.CancelledError:
                raise
            except ValidationError as exc:
                self._lost(f"a snapshot did not match contract version {CONTRACT_VERSION}: {exc.errors()[:1]}")
            except Exception as exc:  # any failure means: reconnect
                self._lost(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _lost(self, why: str) -> None:
        if self.connected or self.last_error != why:
            log.warning("lost the loader at %s (%s); serving the last known workers", self.url, why)
        self.connected = False
        self.last_error = why
        if self.on_connection is not None:
            self.on_connection(False)
        # Wake waiters so they can notice the loader is gone.
        if self.snapshot is not None:
            event, self._updated = self._updated, asyncio.Event()
            event.set()

    # --- loads -------------------------------------------------------------------

    def last_used(self, unit: str) -> float | None:
        """When this gateway process last sent the worker a request (wall time)."""
        return self._last_used.get(unit)

    async def keep_alive(self, model: str, seconds: float) -> None:
        """A client's keep_alive for the model (Ollama's): how long it may stay idle; 0
        sleeps or stops it now, -1 keeps it until evicted."""
        try:
            async with self._session.post(
                self.url + "/keep-alive",
                json={"model": model, "seconds": seconds},
                headers=self._auth(),
                timeout=aiohttp.ClientTimeout(total=30),
            ) as resp:
                if resp.status == 404:
                    raise ModelNotFound(model, [])
                resp.raise_for_status()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise LoaderUnavailable(f"the loader cannot be reached to set keep_alive of '{model}': {exc}") from exc

    async def status(self) -> Status:
        """The loader's /status (for the status page): bounded in size and time."""
        try:
            async with self._session.get(
                self.url + "/status", headers=self._auth(), timeout=aiohttp.ClientTimeout(total=STATUS_TIMEOUT_S)
            ) as resp:
                resp.raise_for_status()
                body = await resp.content.read(MAX_STATUS_BYTES + 1)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise LoaderUnavailable(f"the loader's status cannot be read: {exc}") from exc
        if len(body) > MAX_STATUS_BYTES:
            raise LoaderUnavailable(f"the loader's status exceeds {MAX_STATUS_BYTES} bytes")
        try:
            return Status.model_validate_json(body)
        except ValidationError as exc:
            raise LoaderUnavailable(f"the loader's status did not match the contract: {exc.errors()[:1]}") from None

    async def request_load(
        self, model: str, protect_s: float | None = None, priority: str | None = None, traceparent: bytes | None = None
    ) -> LoadAccepted:
        """Ask for a load without waiting for it; the answer says as of which snapshot
        (epoch and seq) the request is reflected. With ``protect_s``, the load may not
        evict a model used interactively within that many seconds (WouldEvict if it must)."""
        # Fresh usage first: the load may evict the least recently used worker.
        await self.flush_usage()
        try:
            timeout = aiohttp.ClientTimeout(total=30)
            async with self._session.post(
                self.url + "/load",
                json={"model": model, "wait": False, "protect_interactive_s": protect_s, "priority": priority},
                headers={**self._auth(), **({"traceparent": traceparent.decode()} if traceparent else {})},
                timeout=timeout,
            ) as resp:
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise LoaderUnavailable(f"the loader cannot be reached to load '{model}': {exc}") from exc
        if resp.status >= 400:
            err = body.get("error", {}) if isinstance(body, dict) else {}
            message = str(err.get("message", f"loader answered {resp.status}"))
            if resp.status == 404:
                raise ModelNotFound(model, [])
            if resp.status == 409 and err.get("code") == WouldEvict.code:
                raise WouldEvict(message)
            if resp.status >= 500:
                retry = resp.headers.get("Retry-After", "")
                if err.get("code") in ("no_capacity", "swap_deferred"):
                    raise NoCapacity(message)
                raise LoadFailed(message, int(retry) if retry.isdigit() else None)
            raise SswError(message)
        return LoadAccepted.model_validate(body)
