"""Runs the roles: builds them from the config, serves their APIs, and shuts
down cleanly on SIGTERM/SIGINT (workers are left running for adoption)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import ssl
from collections.abc import Generator
from typing import Any

import aiohttp
import uvicorn

from ssw.batch.app import AsyncTier
from ssw.common.auth import KeyRing
from ssw.config import Config, Listen
from ssw.gateway.app import FleetApp, gateway_app, metrics_app, pool_metrics_app
from ssw.gateway.board.stream import Board
from ssw.gateway.edge import edge_protocol
from ssw.gateway.handler import Gateway
from ssw.gateway.loader_client import LoaderClient
from ssw.gateway.pool import GatewayPool, Reporter, child_slot, reuse_port_socket
from ssw.loader.app import admin_app
from ssw.loader.gpus import make_gpu_source
from ssw.loader.role import Loader
from ssw.loader.systemd.bus import Systemd
from ssw.notify import Notifier

log = logging.getLogger(__name__)
STATUS_EVERY_S = 2.0
KEYS_POLL_S = 2.0
# A gateway starts serving once it follows the loader (a restarted or added process turns
# nobody away for the moment it takes), or after this long with the loader away (then its
# requests get 503 with "retry shortly" until it answers).
FIRST_SNAPSHOT_WAIT_S = 10.0


class _Server(uvicorn.Server):
    # Signals are handled once for all roles in this process, below.
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


BACKLOG = 4096


def _server(
    app: Any, listen: Listen, cfg: Config, graceful_s: float, public: bool = False, tls: dict[str, Any] | None = None
) -> _Server:
    # The public port and the fleet listener get the edge's limits (connections, header
    # deadline and size); the loopback listeners (admin, metrics) uvicorn's own protocol.
    http: Any = edge_protocol(cfg.limits)[0] if public else "httptools"
    return _Server(
        uvicorn.Config(
            app,
            host=listen.host,
            port=listen.port,
            loop="none",
            http=http,
            **(tls or {}),
            lifespan="off",
            access_log=False,
            log_config=None,
            log_level=cfg.log_level,
            timeout_graceful_shutdown=int(graceful_s) if graceful_s else None,
            timeout_keep_alive=30,
            backlog=BACKLOG,
        )
    )


async def run(cfg: Config, roles: set[str], config_path: str | None = None) -> int:
    notifier = Notifier()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    # (server, the sockets it serves on: None to bind its listen address itself)
    servers: list[tuple[_Server, list[socket.socket] | None]] = []
    cleanups: list[Any] = []
    background: list[asyncio.Task[None]] = []
    loader: Loader | None = None
    gateway: Gateway | None = None
    pool: GatewayPool | None = None
    slot = child_slot()  # set when this process is one of several gateway processes
    boards: list[Board] = []  # the status page's streams, ended first on shutdown
    try:
        if "loader" in roles:
            systemd = await Systemd.connect(cfg.systemd.bus_address)
            cleanups.append(systemd.close)
            loader = await Loader.create(cfg, systemd, make_gpu_source(cfg.gpus))
            await loader.start()  # adoption happens before READY
            cleanups.append(loader.close)
            # The event stream never ends by itself; do not wait long for it.
            servers.append((_server(admin_app(loader), cfg.admin, cfg, 2), None))
        if "gateway" in roles and cfg.gateway.processes > 1 and slot is None:
            pool = GatewayPool(cfg, config_path)
            stopping_pool = pool
            # Before any child starts: a SIGHUP (a key reload) while they start must not
            # take its default action, which ends the process.
            loop.add_signal_handler(signal.SIGHUP, lambda: stopping_pool.signal_all(signal.SIGHUP))
            await pool.start()
            cleanups.append(lambda: stopping_pool.stop(cfg.gateway.shutdown_timeout_s + 5))
            if cfg.gateway.metrics_listen is not None:
                servers.append((_server(pool_metrics_app(pool), cfg.gateway.metrics_listen, cfg, 1), None))
        elif "gateway" in roles:
            gateway = await _gateway(cfg, cleanups, background)
            if loader is None and not await gateway.loader.first_snapshot(FIRST_SNAPSHOT_WAIT_S):
                log.warning("the loader at %s has not answered yet; serving anyway", cfg.gateway.loader_url)
            tier = await AsyncTier.create(cfg, gateway)
            tier.start()
            cleanups.append(tier.close)
            graceful = cfg.gateway.shutdown_timeout_s
            app = _public_app(gateway, tier)
            boards.append(app.board)
            listeners: list[tuple[Any, Listen, dict[str, Any] | None]] = [(app, cfg.public, None)]
            if cfg.fleet.enabled and cfg.fleet.listen is not None:
                listeners.append((FleetApp(app), cfg.fleet.listen, _fleet_tls(cfg)))
            for served, listen, tls in listeners:
                # One of several processes: the kernel spreads connections over them.
                socks = None if slot is None else [reuse_port_socket(listen, BACKLOG)]
                servers.append((_server(served, listen, cfg, graceful, public=True, tls=tls), socks))
            if slot is None and cfg.gateway.metrics_listen is not None:
                # (with several processes, the parent serves the metrics of them all)
                servers.append((_server(metrics_app(gateway), cfg.gateway.metrics_listen, cfg, 1), None))

        # Everything built so far (modules, apps, the registry) lives as long as the
        # process: out of the collector's sight, a full collection walks only what
        # requests create. Measured: gen-2 pauses of 60-75 ms under load, gone.
        gc.collect()
        gc.freeze()
        tasks = [asyncio.create_task(server.serve(sockets=socks)) for server, socks in servers]
        while not all(server.started for server, _ in servers):
            if any(t.done() for t in tasks):
                log.error("a server failed to start")
                return 3
            await asyncio.sleep(0.05)
        if slot is not None and gateway is not None:
            reporter = Reporter()
            reporter.ready()
            background.append(asyncio.create_task(reporter.beat(gateway.in_flight)))
        notifier.ready(_status_line(loader, gateway, pool))
        watchdog = asyncio.create_task(notifier.watchdog(pool.healthy if pool else None))
        stopper = asyncio.create_task(stop.wait())
        status_task = asyncio.create_task(_status_updates(notifier, loader, gateway, pool))
        await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        log.info("stopping; workers keep running")
        notifier.stopping()
        if loader is not None:
            loader.closing.set()
        for board in boards:
            board.closing.set()
        for server, _ in servers:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in (watchdog, stopper, status_task, *background):
            t.cancel()
        return 0 if stop.is_set() else 1
    finally:
        for cleanup in reversed(cleanups):
            with contextlib.suppress(Exception):
                result = cleanup()
                if asyncio.iscoroutine(result):
                    await result


async def _gateway(cfg: Config, cleanups: list[Any], background: list[asyncio.Task[None]]) -> Gateway:
    """One gateway: its channel to the loader, its keys, its accounting."""
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, keepalive_timeout=30),
        auto_decompress=False,
    )
    cleanups.append(session.close)
    client = LoaderClient(cfg.gateway.loader_url, session, cfg.auth.gateway_token_file)
    client.start()
    cleanups.append(client.close)
    gateway = Gateway(cfg, client)
    cleanups.append(gateway.close)
    if not cfg.auth.enabled:
        log.warning("auth.enabled is false: anyone who reaches port %d may use every model", cfg.public.port)
    elif len(gateway.keys) == 0:
        log.warning("no API keys in %s: every request will be refused (ssw keys add NAME)", cfg.auth.keys_file)
    keyring = gateway.keys
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: keyring.reload(force=True))
    background.append(asyncio.create_task(_watch_keys(keyring)))
    gateway.accounting.start()
    cleanups.append(gateway.accounting.close)
    if gateway.fleet is not None:
        gateway.fleet.start()
    return gateway


def _fleet_tls(cfg: Config) -> dict[str, Any] | None:
    """The fleet listener's TLS: this host's certificate, and the peer's required and
    checked against the fleet's CA (mutual TLS). None: fleet.insecure without files."""
    f = cfg.fleet
    if f.tls_cert_file is None or f.tls_key_file is None:
        return None
    tls: dict[str, Any] = {"ssl_certfile": str(f.tls_cert_file), "ssl_keyfile": str(f.tls_key_file)}
    if f.tls_ca_file is not None:
        tls |= {"ssl_ca_certs": str(f.tls_ca_file), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return tls


def _public_app(gateway: Gateway, tier: AsyncTier) -> Any:
    app = gateway_app(gateway)
    tier.install(app.api)
    app.board.sources["batches"] = tier.board_summary
    return app


def _status_line(loader: Loader | None, gateway: Gateway | None, pool: GatewayPool | None = None) -> str:
    """One line for `systemctl status`: what is loaded, what is in flight."""
    parts = []
    if loader is not None:
        ws = list(loader.manager.table)
        ready = sorted({w.model for w in ws if w.state == "ready"})
        starting = sum(1 for w in ws if w.state == "starting")
        leaving = sum(1 for w in ws if w.state in ("draining", "stopping"))
        parts.append(
            f"{len(ready)} models ready ({', '.join(ready) or 'none'})"
            + (f", {starting} starting" if starting else "")
            + (f", {leaving} stopping" if leaving else "")
        )
    if gateway is not None:
        parts.append(f"{gateway.in_flight()} requests in flight")
        if not gateway.loader.connected:
            parts.append("loader not connected")
    if pool is not None:
        parts.append(f"{pool.in_flight()} requests in flight over {pool.size} gateway processes")
    return "; ".join(parts) or "serving"


async def _status_updates(
    notifier: Notifier, loader: Loader | None, gateway: Gateway | None, pool: GatewayPool | None
) -> None:
    last = ""
    while True:
        await asyncio.sleep(STATUS_EVERY_S)
        line = _status_line(loader, gateway, pool)
        if line != last:
            notifier.status(line)
            last = line


async def _watch_keys(keyring: KeyRing) -> None:
    """Pick up added and revoked keys without a restart (SIGHUP does it at once)."""
    while True:
        await asyncio.sleep(KEYS_POLL_S)
        keyring.reload()
