"""The gateway's side of the local channel to the loader: a pushed stream of
snapshots (models, aliases, workers) and load requests.

If the loader goes away, the last snapshot stays in force, so the gateway
keeps serving the workers it knows while the loader restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from .auth import read_token
from .errors import LoaderUnavailable, LoadFailed, ModelNotFound, NoCapacity, SswError

log = logging.getLogger(__name__)
USAGE_REPORT_INTERVAL_S = 2.0


class LoaderClient:
    def __init__(self, url: str, session: aiohttp.ClientSession, token_file: Path | None = None) -> None:
        self.url = url.rstrip("/")
        self._session = session
        self._token_file = token_file
        self._token: str | None = None
        self.snapshot: dict[str, Any] | None = None
        self.connected = False
        self._updated = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_used: dict[str, float] = {}
        self._unsent: set[str] = set()
        self._listeners: list[Callable[[], None]] = []

    def _auth(self) -> dict[str, str]:
        # Read lazily: the loader creates the token at its first start.
        if self._token is None and self._token_file is not None:
            self._token = read_token(self._token_file)
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def on_snapshot(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._follow()), asyncio.create_task(self._report_usage())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- usage: when each worker last served, for the loader's LRU eviction ------

    def used(self, unit: str) -> None:
        self._last_used[unit] = time.time()
        self._unsent.add(unit)

    async def flush_usage(self) -> None:
        if not self._unsent:
            return
        batch = {u: self._last_used[u] for u in self._unsent if u in self._last_used}
        self._unsent.clear()
        try:
            async with self._session.post(
                self.url + "/usage",
                json={"last_used": batch},
                headers=self._auth(),
                timeout=aiohttp.ClientTimeout(total=5),
            ) as resp:
                resp.raise_for_status()
        except (aiohttp.ClientError, OSError, TimeoutError):
            self._unsent.update(batch)  # sent again with the next batch

    async def _report_usage(self) -> None:
        while True:
            await asyncio.sleep(USAGE_REPORT_INTERVAL_S)
            await self.flush_usage()

    async def wait_update(self, timeout: float) -> None:
        """Until the next snapshot arrives (or the timeout passes)."""
        event = self._updated
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    def _publish(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = snapshot
        event, self._updated = self._updated, asyncio.Event()
        event.set()
        for listener in self._listeners:
            listener()

    async def _follow(self) -> None:
        backoff = 0.2
        while True:
            try:
                timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
                async with self._session.get(self.url + "/events", headers=self._auth(), timeout=timeout) as resp:
                    if resp.status == 401:
                        self._token = None  # re-read: the loader may have created a new one
                        log.error("the loader refused the gateway's token from %s", self._token_file)
                    resp.raise_for_status()
                    if not self.connected:
                        log.info("connected to the loader at %s", self.url)
                        # A restarted loader knows no usage: tell it all again.
                        self._unsent.update(self._last_used)
                    self.connected = True
                    backoff = 0.2
                    data: list[bytes] = []
                    async for raw in resp.content:
                        line = raw.rstrip(b"\r\n")
                        if line.startswith(b"data:"):
                            data.append(line[5:].lstrip())
                        elif not line and data:
                            self._publish(json.loads(b"\n".join(data)))
                            data = []
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                if self.connected:
                    log.warning("lost the loader at %s (%s); serving the last known workers", self.url, exc)
            self.connected = False
            # Wake waiters so they can notice the loader is gone.
            if self.snapshot is not None:
                self._publish(self.snapshot)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def request_load(self, model: str) -> int:
        """Ask for a load without waiting for it; returns the snapshot sequence number
        that already reflects the request."""
        # Fresh usage first: the load may evict the least recently used worker.
        await self.flush_usage()
        try:
            timeout = aiohttp.ClientTimeout(total=30)
            async with self._session.post(
                self.url + "/load", json={"model": model, "wait": False}, headers=self._auth(), timeout=timeout
            ) as resp:
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise LoaderUnavailable(f"the loader cannot be reached to load '{model}': {exc}") from exc
        if resp.status >= 400:
            err = body.get("error", {}) if isinstance(body, dict) else {}
            message = str(err.get("message", f"loader answered {resp.status}"))
            if resp.status == 404:
                raise ModelNotFound(model, [])
            if resp.status >= 500:
                retry = resp.headers.get("Retry-After", "")
                if err.get("code") == "no_capacity":
                    raise NoCapacity(message)
                raise LoadFailed(message, int(retry) if retry.isdigit() else None)
            raise SswError(message)
        return int(body.get("seq", 0))
