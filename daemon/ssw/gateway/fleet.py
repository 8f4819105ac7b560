"""A fleet of hosts on one shared Redis: what each host tells the others, and
what a gateway knows of them.

Each loader publishes its host's state (:class:`ssw.common.contract.HostRecord`:
GPUs, models on disk, workers, load times, where a load would fit) every
``fleet.heartbeat_s`` under ``ssw:fleet:host:<name>`` with a TTL of
``fleet.ttl_s``: a host that dies or is cut off drops out of everyone's
routing within the TTL, without anyone having to notice it.

Each gateway reads every host's record as often (:class:`FleetView`), routes
to another host's gateway when only that host has the model ready, and
decides where a model loads fleet-wide with a lease (``ssw:fleet:load:<model>``,
SET NX): however many gateways ask at once, one host loads it. Host-to-host
requests go to the other host's fleet listener over TLS (mutual: each host
presents its certificate, signed by the fleet's CA) and carry a claim signed
with the fleet's secret (:mod:`ssw.gateway.hops`), never the secret or a client's key.
A peer that cannot be reached from here is passed over for a while
(``UNREACHABLE_FOR_S``), whatever its record in Redis says: an asymmetric
partition (Redis reachable, the peer not) costs one failed connection.

When the fleet's Redis is down, every host keeps serving its own models, and
says so (``/health``, ``ssw_fleet_connected``); records older than the TTL
are dropped, so nothing is routed to a host that may be gone.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp
import orjson
from redis.exceptions import RedisError

from ssw.common import tasks
from ssw.common.auth import read_token
from ssw.common.contract import HostRecord
from ssw.common.fleet_wire import LOG_EVERY_S, PREFIX, REDIS_TIMEOUT_S, fleet_redis, read_hosts, redacted
from ssw.common.states import LoadState, WorkerState
from ssw.config import FleetSettings
from ssw.errors import SswError
from ssw.gateway import hops

log = logging.getLogger(__name__)
LOAD_PATH = "/v1/ssw/fleet/load"
UNREACHABLE_FOR_S = 15.0  # a peer this host could not connect to is passed over this long
MAX_ANSWER_BYTES = 64 * 1024  # what a peer's answer to a fleet call may be


class FleetUnavailable(SswError):
    status = 503
    type = "service_unavailable"
    code = "fleet_unavailable"


def client_ssl(settings: FleetSettings) -> ssl.SSLContext | None:
    """How this host's gateway speaks TLS to the others': their certificates checked
    against the fleet's CA, its own presented."""
    if settings.tls_ca_file is None:
        return None
    ctx = ssl.create_default_context(cafile=str(settings.tls_ca_file))
    if settings.tls_cert_file and settings.tls_key_file:
        ctx.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file))
    return ctx


def warn_if_insecure(settings: FleetSettings) -> None:
    if settings.enabled and settings.insecure:
        log.warning(
            "fleet.insecure is true: hops to other hosts (%s) and the fleet's Redis may go in clear; anyone on "
            "the fleet's network can read prompts and answers",
            settings.advertise_url,
        )


class FleetView:
    """The gateway's side: every host's latest record, the load leases, and the
    calls to other hosts' gateways."""

    def __init__(self, settings: FleetSettings, on_change: Callable[[], None]) -> None:
        self.settings = settings
        self.host = settings.host_name()
        self.url = settings.advertise_url or ""
        self.hosts: dict[str, HostRecord] = {}  # every live host, this one included
        self.version = 0  # bumped on every change of `hosts`
        self.connected = False
        self.last_error: str | None = None
        self._on_change = on_change
        self._redis = fleet_redis(settings)
        self._secret: bytes | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._warned = 0.0
        self.verifier = hops.Verifier(self.host)
        self._unreachable: dict[str, float] = {}  # host -> until when (monotonic) it is passed over

    @property
    def secret(self) -> bytes:
        if self._secret is None:
            # The same file on every host (Ansible puts it there); it never travels.
            self._secret = (read_token(self.settings.credential_file) or "").encode()
        if not self._secret:
            raise FleetUnavailable(f"the fleet's secret {self.settings.credential_file} cannot be read")
        return self._secret

    def ssl_context(self) -> ssl.SSLContext | None:
        return client_ssl(self.settings)

    def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ssl=self.ssl_context() or True)
        self._session = aiohttp.ClientSession(connector=connector, max_line_size=8190, max_field_size=8190)
        self._task = asyncio.create_task(self._run())

    def claim(self, host: str, key: str, priority: str, wait: bool, fallback: bool | None, method: str,
              path: str, body: bytes) -> bytes:  # fmt: skip
        """The signed claim for one hop to ``host``."""
        return hops.make(
            self.secret,
            iss=self.host,
            aud=host,
            key=key,
            priority=priority,
            wait=wait,
            fallback=fallback,
            method=method,
            path=path,
            body=body,
        ).encode()

    def check(self, header: bytes, method: str, path: str) -> hops.Claim:
        """A hop's claim, checked (but for its body); BadClaim otherwise."""
        try:
            secret = self.secret
        except FleetUnavailable as exc:
            raise hops.BadClaim(exc.message) from None
        return self.verifier.check(secret, header, method, path)

    # --- peers this host cannot reach ---------------------------------------------------------

    def unreachable(self, host: str, why: str) -> None:
        """Pass ``host`` over for a while: it cannot be reached from here (it may still
        publish to Redis: an asymmetric partition)."""
        if self._unreachable.get(host, 0.0) <= time.monotonic():
            log.warning("fleet: host %s cannot be reached from here (%s); passed over for %.0f s", host, why,
                        UNREACHABLE_FOR_S)  # fmt: skip
        self._unreachable[host] = time.monotonic() + UNREACHABLE_FOR_S
        self.version += 1
        self._on_change()

    def reachable(self, host: str) -> bool:
        until = self._unreachable.get(host)
        if until is None:
            return True
        if until <= time.monotonic():
            del self._unreachable[host]
            self.version += 1  # routing to it may resume
            return True
        return False

    async def close(self) -> None:
        await tasks.cancel(self._task)
        if self._session is not None:
            await self._session.close()
        await self._redis.aclose()

    # --- following the fleet --------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                log.exception("fleet: reading the fleet failed")
            await asyncio.sleep(self.settings.heartbeat_s)

    async def refresh(self) -> None:
        try:
            hosts = await read_hosts(self._redis, self.settings.ttl_s)
        except (RedisError, OSError, TimeoutError) as exc:
            self._lost(str(exc), time.time())
            return
        if not self.connected:
            log.info("fleet: following %d hosts in %s", len(hosts), redacted(self.settings.redis_url))
        flipped = not self.connected
        self.connected, self.last_error = True, None
        self._set(hosts, flipped)

    def _lost(self, why: str, now: float) -> None:
        if self.connected or time.monotonic() - self._warned > LOG_EVERY_S:
            self._warned = time.monotonic()
            log.warning("fleet: the fleet's Redis cannot be reached (%s); serving this host's models", why)
        flipped = self.connected
        self.connected, self.last_error = False, why
        # What was heard within the TTL may still be used; nothing older.
        self._set({n: r for n, r in self.hosts.items() if r.at + self.settings.ttl_s > now}, flipped)

    def _set(self, hosts: dict[str, HostRecord], flipped: bool = False) -> None:
        before = {n: (r.epoch, r.at) for n, r in self.hosts.items()}
        gone = set(self.hosts) - set(hosts)
        for name in gone:
            log.warning("fleet: host %s dropped (no heartbeat within %.0f s)", name, self.settings.ttl_s)
        for name in set(hosts) - set(self.hosts):
            log.info("fleet: host %s joined (%s)", name, hosts[name].url)
        self.hosts = hosts
        if before != {n: (r.epoch, r.at) for n, r in hosts.items()}:
            self.version += 1
            self._on_change()
        elif flipped:
            self._on_change()

    def others(self) -> dict[str, HostRecord]:
        return {n: r for n, r in self.hosts.items() if n != self.host}

    # --- where a model loads -----------------------------------------------------------------

    async def place(self, model: str) -> str:
        """The host that loads ``model``, decided once fleet-wide: the standing lease if
        its host is alive, else the best host now, claimed with SET NX."""
        key = PREFIX + "load:" + model
        lease_ms = int(self.settings.load_lease_s * 1000)
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                got = await self._redis.get(key)
                holder = str(got) if got is not None else None
                if holder is not None and holder in self.hosts and (holder == self.host or self.reachable(holder)):
                    return holder
                if holder is not None and holder not in self.hosts:
                    # The host it was given to is gone: place it again.
                    await self._redis.delete(key)
                choice = choose_host(self.options(model))
                if choice is None:
                    raise FleetUnavailable(f"no host of the fleet can load '{model}' now")
                if holder is not None and holder in self.hosts:
                    # Given to a host this one cannot reach: the others may, so its lease
                    # stands; this gateway goes elsewhere (here, most often).
                    return choice
                if await self._redis.set(key, choice, nx=True, px=lease_ms):
                    log.info("fleet: %s loads on %s", model, choice)
                    return choice
                return str(await self._redis.get(key) or choice)
        except (RedisError, OSError, TimeoutError) as exc:
            raise FleetUnavailable(f"the fleet's Redis cannot be reached to place '{model}': {exc}") from exc

    def options(self, model: str) -> list[HostOption]:
        out = []
        for name, record in self.hosts.items():
            if name != self.host and not self.reachable(name):
                continue
            entry = record.models.get(model)
            if entry is None:
                continue
            loading = entry.load.state is LoadState.LOADING or any(
                w.model == model and w.rank == 0 and w.state is not WorkerState.FAILED for w in record.workers
            )
            preview = record.previews.get(model)
            if not loading and preview is None:
                continue
            out.append(
                HostOption(
                    name,
                    loading,
                    preview.free_after_bytes if preview else 0,
                    entry.load_seconds,
                    preview.victims if preview else 0,
                )
            )
        return out

    async def ask_load(self, host: str, model: str, key: str, priority: str) -> float:
        """Ask another host's gateway to load a model (it asks its loader); returns when,
        by that host's clock, its load record entered the state it is in."""
        record = self.hosts.get(host)
        if record is None or self._session is None:
            raise FleetUnavailable(f"host {host} is not in the fleet")
        body = orjson.dumps({"model": model})
        claim = self.claim(host, key, priority, True, None, "POST", LOAD_PATH, body)
        try:
            async with self._session.post(
                record.url + LOAD_PATH,
                data=body,
                headers={hops.HEADER.decode(): claim.decode(), "content-type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=30),
            ) as resp:
                data = await resp.content.read(MAX_ANSWER_BYTES)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.unreachable(host, str(exc) or type(exc).__name__)
            raise FleetUnavailable(f"host {host} cannot be reached to load '{model}': {exc}") from exc
        try:
            answer = orjson.loads(data)
        except ValueError:
            answer = {}
        if resp.status >= 400:
            err = answer.get("error", {}) if isinstance(answer, dict) else {}
            message = err.get("message", resp.status) if isinstance(err, dict) else resp.status
            raise FleetUnavailable(f"host {host} cannot load '{model}': {message}")
        load = answer.get("load") if isinstance(answer, dict) else None
        since = load.get("since") if isinstance(load, dict) else None
        return float(since) if isinstance(since, int | float) else 0.0


@dataclass(frozen=True)
class HostOption:
    """A host of the fleet that could serve a model that is ready nowhere."""

    host: str
    loading: bool  # a load of it is already under way there
    free_after: int  # bytes free on the GPU it would take, after the evictions it needs
    load_seconds: float | None  # measured there; None: never loaded there
    victims: int


def choose_host(options: Sequence[HostOption]) -> str | None:
    """Where a model loads, fleet-wide: where it already loads; else the most free
    VRAM after the evictions it needs, then the fastest measured load, then the
    fewest victims (name breaks ties, so every gateway decides alike)."""
    if not options:
        return None
    best = min(
        options,
        key=lambda o: (
            not o.loading,
            -o.free_after,
            o.load_seconds if o.load_seconds is not None else math.inf,
            o.victims,
            o.host,
        ),
    )
    return best.host
