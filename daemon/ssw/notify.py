"""sd_notify: READY, STATUS, STOPPING and the watchdog. Does nothing outside systemd."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import sdnotify


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._n = sdnotify.SystemdNotifier() if self.enabled else None

    def _send(self, text: str) -> None:
        if self._n is not None:
            self._n.notify(text)

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def stopping(self) -> None:
        self._send("STOPPING=1\nSTATUS=stopping")

    async def watchdog(self, healthy: Callable[[], bool] | None = None) -> None:
        """Ping at half of WatchdogSec from the event loop itself, so a wedged loop
        stops the pings and systemd restarts the service; with ``healthy``, only
        while it says so (the gateway processes a parent watches)."""
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if not self.enabled or usec <= 0:
            return
        while True:
            if healthy is None or healthy():
                self._send("WATCHDOG=1")
            await asyncio.sleep(usec / 2e6)
