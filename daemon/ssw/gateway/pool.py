"""Several gateway processes on one port (``gateway.processes``): the gateway's
relay is CPU-bound Python, so a host with more cores than one serves more
with more processes.

The parent (the ssw-gateway service's main process) spawns the children and
watches them; it answers nothing on the public port itself. Each child is a
whole gateway: it binds the public port with SO_REUSEPORT (the kernel
spreads connections over the children), follows the loader on its own
channel, holds its own waiting requests and reloads the API keys itself (the
parent forwards SIGHUP). A child tells the parent it is ready, then beats
once a second with its requests in flight, over a pipe; a child that dies is
replaced, and one whose parent is gone exits (its next beat fails).

Metrics add up across the children through prometheus_client's multiprocess
mode (a directory under the unit's private /tmp); the parent serves them on
gateway.metrics_listen, and pings systemd's watchdog only while every child
beats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from ssw.config import Config, Listen

log = logging.getLogger(__name__)

ENV_SLOT = "SSW_GATEWAY_SLOT"  # set in a child: which one it is
ENV_PIPE = "SSW_GATEWAY_PIPE"  # set in a child: the descriptor it reports on
BEAT_S = 1.0
SILENT_AFTER_S = 10.0  # a child that has not beaten this long is wedged
RESPAWN_DELAY_S = 1.0


def reuse_port_socket(listen: Listen, backlog: int) -> socket.socket:
    """The public listener of one of several processes: the kernel spreads
    connections over every socket bound to the port with SO_REUSEPORT."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((listen.host, listen.port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def child_slot() -> int | None:
    """In a child: which one it is; None in any other process."""
    value = os.environ.get(ENV_SLOT)
    return int(value) if value is not None else None


class Reporter:
    """A child's side of the pipe: ready once, then a beat a second."""

    def __init__(self) -> None:
        self.fd = int(os.environ[ENV_PIPE])

    def _say(self, line: str) -> None:
        try:
            os.write(self.fd, line.encode() + b"\n")
        except BrokenPipeError:
            log.error("the parent gateway process is gone; exiting")
            os._exit(1)

    def ready(self) -> None:
        self._say("ready")

    async def beat(self, in_flight: Callable[[], int]) -> None:
        while True:
            self._say(f"beat {in_flight()}")
            await asyncio.sleep(BEAT_S)


@dataclass
class _Child:
    slot: int
    proc: asyncio.subprocess.Process
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    last_beat: float = field(default_factory=time.monotonic)
    in_flight: int = 0


class GatewayPool:
    def __init__(self, cfg: Config, config_path: str | None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.size = cfg.gateway.processes
        # Under the unit's PrivateTmp: the children's metric files, gone with the service.
        self.metrics_dir = tempfile.mkdtemp(prefix="ssw-gateway-metrics-")
        self.children: dict[int, _Child] = {}
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, timeout: float = 60.0) -> None:
        for slot in range(1, self.size + 1):
            await self._spawn(slot)
        async with asyncio.timeout(timeout):
            for child in list(self.children.values()):
                await child.ready.wait()
        log.info("%d gateway processes serving on %s:%d", self.size, self.cfg.public.host, self.cfg.public.port)

    async def _spawn(self, slot: int) -> None:
        read_fd, write_fd = os.pipe()
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        env.update({ENV_SLOT: str(slot), ENV_PIPE: str(write_fd), "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir})
        argv = [sys.executable, "-m", "ssw.cli"]
        if self.config_path:
            argv += ["--config", self.config_path]
        proc = await asyncio.create_subprocess_exec(
            *argv, "gateway", env=env, pass_fds=(write_fd,), preexec_fn=_ignore_sighup
        )
        os.close(write_fd)
        child = _Child(slot, proc)
        self.children[slot] = child
        self._track(self._listen(child, read_fd))
        self._track(self._watch(child))

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _listen(self, child: _Child, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
        )
        try:
            while line := await reader.readline():
                word, _, rest = line.decode().strip().partition(" ")
                child.last_beat = time.monotonic()
                if word == "ready":
                    child.ready.set()
                elif word == "beat" and rest.isdigit():
                    child.in_flight = int(rest)
        finally:
            transport.close()

    async def _watch(self, child: _Child) -> None:
        code = await child.proc.wait()
        if self._stopping:
            return
        log.error("gateway process %d (pid %d) exited with %s; starting another", child.slot, child.proc.pid, code)
        with contextlib.suppress(Exception):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(child.proc.pid, self.metrics_dir)
        await asyncio.sleep(RESPAWN_DELAY_S)
        if not self._stopping:
            await self._spawn(child.slot)

    def healthy(self) -> bool:
        """Every child alive and beating: what the watchdog pings for."""
        now = time.monotonic()
        return all(
            c.proc.returncode is None and c.ready.is_set() and now - c.last_beat < SILENT_AFTER_S
            for c in self.children.values()
        )

    def in_flight(self) -> int:
        return sum(c.in_flight for c in self.children.values())

    def signal_all(self, sig: int) -> None:
        for child in self.children.values():
            if child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(sig)

    async def stop(self, timeout: float) -> None:
        """SIGTERM to every child (each drains its requests), SIGKILL what is left after timeout."""
        self._stopping = True
        self.signal_all(signal.SIGTERM)
        procs = [c.proc for c in self.children.values()]
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(p.wait() for p in procs))
        except TimeoutError:
            self.signal_all(signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in procs))
        for task in list(self._tasks):
            task.cancel()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)


def _ignore_sighup() -> None:
    """In a new child, until it sets its own handler (a key reload then): a SIGHUP
    passed on while it starts would otherwise end it."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
