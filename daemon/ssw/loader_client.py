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
from typing import Any

import aiohttp

from .errors import LoaderUnavailable, LoadFailed, ModelNotFound, SswError

log = logging.getLogger(__name__)


class LoaderClient:
    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url.rstrip("/")
        self._session = session
        self.snapshot: dict[str, Any] | None = None
        self.connected = False
        self._updated = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait_update(self, timeout: float) -> None:
        """Until the next snapshot arrives (or the timeout passes)."""
        event = self._updated
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    def _publish(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = snapshot
        event, self._updated = self._updated, asyncio.Event()
        event.set()

    async def _follow(self) -> None:
        backoff = 0.2
        while True:
            try:
                timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
                async with self._session.get(self.url + "/events", timeout=timeout) as resp:
                    resp.raise_for_status()
                    if not self.connected:
                        log.info("connected to the loader at %s", self.url)
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
        """Ask for a load without waiting for it; returns the snapshot version that
        already reflects the request."""
        try:
            timeout = aiohttp.ClientTimeout(total=30)
            async with self._session.post(
                self.url + "/load", json={"model": model, "wait": False}, timeout=timeout
            ) as resp:
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise LoaderUnavailable(f"the loader cannot be reached to load '{model}': {exc}") from exc
        if resp.status >= 400:
            err = body.get("error", {}) if isinstance(body, dict) else {}
            message = str(err.get("message", f"loader answered {resp.status}"))
            if resp.status == 404:
                raise ModelNotFound(model, [])
            exc_type: type[SswError] = LoadFailed if resp.status >= 500 else SswError
            raise exc_type(message)
        return int(body.get("seq", 0))
