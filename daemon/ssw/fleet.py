"""A fleet of hosts on one shared Redis: what each host tells the others, and
what a gateway knows of them.

Each loader publishes its host's state (:class:`ssw.contract.HostRecord`:
GPUs, models on disk, workers, load times, where a load would fit) every
``fleet.heartbeat_s`` under ``ssw:fleet:host:<name>`` with a TTL of
``fleet.ttl_s``: a host that dies or is cut off drops out of everyone's
routing within the TTL, without anyone having to notice it.

Each gateway reads every host's record as often (:class:`FleetView`), routes
to another host's gateway when only that host has the model ready, and
decides where a model loads fleet-wide with a lease (``ssw:fleet:load:<model>``,
SET NX): however many gateways ask at once, one host loads it. Host-to-host
requests carry the fleet credential (``fleet.credential_file``); a client's
API key can never stand in for it.

When the fleet's Redis is down, every host keeps serving its own models, and
says so (``/health``, ``ssw_fleet_connected``); records older than the TTL
are dropped, so nothing is routed to a host that may be gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import ssl
import time
from collections.abc import Awaitable, Callable

import aiohttp
import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import RedisError

from . import tasks
from .auth import read_token
from .config import FleetSettings
from .contract import HostRecord
from .errors import SswError
from .lifecycle import LoadState, WorkerState
from .placement import HostOption, choose_host

log = logging.getLogger(__name__)
PREFIX = "ssw:fleet:"
REDIS_TIMEOUT_S = 2.0
TOKEN_HEADER = b"x-ssw-fleet-token"
KEY_HEADER = b"x-ssw-fleet-key"
LOG_EVERY_S = 30.0


class FleetUnavailable(SswError):
    status = 503
    type = "service_unavailable"
    code = "fleet_unavailable"


def fleet_redis(settings: FleetSettings) -> aioredis.Redis:
    assert settings.redis_url
    return aioredis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        socket_timeout=REDIS_TIMEOUT_S,
        decode_responses=True,
    )


class Publisher:
    """The loader's side: its host's record, every heartbeat."""

    def __init__(self, settings: FleetSettings, record: Callable[[], Awaitable[HostRecord]]) -> None:
        self.settings = settings
        self.host = settings.host_name()
        self._record = record
        self._redis = fleet_redis(settings)
        self._task: asyncio.Task[None] | None = None
        self.connected = False
        self._warned = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        await tasks.cancel(self._task)
        # Leaving on purpose: the others drop this host now, not after the TTL.
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                await self._redis.delete(PREFIX + "host:" + self.host)
        await self._redis.aclose()

    async def publish(self) -> None:
        record = await self._record()
        ttl_ms = int(self.settings.ttl_s * 1000)
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(PREFIX + "host:" + self.host, record.model_dump_json(), px=ttl_ms)
        pipe.zadd(PREFIX + "hosts", {self.host: record.at})
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            await pipe.execute()

    async def _run(self) -> None:
        while True:
            try:
                await self.publish()
                if not self.connected:
                    log.info("fleet: publishing host %s to %s", self.host, _redacted(self.settings.redis_url))
                self.connected = True
            except (RedisError, OSError, TimeoutError) as exc:
                if self.connected or time.monotonic() - self._warned > LOG_EVERY_S:
                    self._warned = time.monotonic()
                    log.warning("fleet: cannot reach the fleet's Redis (%s); this host serves its own models", exc)
                self.connected = False
            except Exception:
                log.exception("fleet: publishing failed")
            await asyncio.sleep(self.settings.heartbeat_s)


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
        self._token: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._warned = 0.0

    @property
    def token(self) -> str:
        if self._token is None:
            # The same file on every host (Ansible puts it there).
            self._token = read_token(self.settings.credential_file)
        if not self._token:
            raise FleetUnavailable(f"the fleet credential {self.settings.credential_file} cannot be read")
        return self._token

    def ssl_context(self) -> ssl.SSLContext | None:
        ca = self.settings.tls_ca_file
        return ssl.create_default_context(cafile=str(ca)) if ca else None

    def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ssl=self.ssl_context() or True)
        self._session = aiohttp.ClientSession(connector=connector)
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        await tasks.cancel(self._task)
        if self._session is not None:
            await self._session.close()
        await self._redis.aclose()

    def trusted(self, presented: bytes | None) -> bool:
        """Whether a request carries the fleet credential (constant time)."""
        if presented is None:
            return False
        try:
            token = self.token
        except FleetUnavailable:
            return False
        return hmac.compare_digest(presented, token.encode())

    # --- following the fleet --------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                log.exception("fleet: reading the fleet failed")
            await asyncio.sleep(self.settings.heartbeat_s)

    async def refresh(self) -> None:
        now = time.time()
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                found = await self._redis.zrangebyscore(PREFIX + "hosts", now - self.settings.ttl_s, "+inf")
                names = [str(n) for n in found]
                raw = await self._redis.mget([PREFIX + "host:" + n for n in names]) if names else []
        except (RedisError, OSError, TimeoutError) as exc:
            self._lost(str(exc), now)
            return
        if not self.connected:
            log.info("fleet: following %d hosts in %s", len(names), _redacted(self.settings.redis_url))
        flipped = not self.connected
        self.connected, self.last_error = True, None
        hosts: dict[str, HostRecord] = {}
        for name, data in zip(names, raw, strict=True):
            if data is None:
                continue  # expired: the host is gone
            try:
                record = HostRecord.model_validate_json(data)
            except ValidationError as exc:
                log.warning("fleet: ignoring host %s: its record does not match this version: %s", name, exc)
                continue
            if record.host == name and record.at + self.settings.ttl_s > now:
                hosts[name] = record
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
                if holder is not None and holder in self.hosts:
                    return holder
                if holder is not None:
                    # The host it was given to is gone: place it again.
                    await self._redis.delete(key)
                choice = choose_host(self.options(model))
                if choice is None:
                    raise FleetUnavailable(f"no host of the fleet can load '{model}' now")
                if await self._redis.set(key, choice, nx=True, px=lease_ms):
                    log.info("fleet: %s loads on %s", model, choice)
                    return choice
                return str(await self._redis.get(key) or choice)
        except (RedisError, OSError, TimeoutError) as exc:
            raise FleetUnavailable(f"the fleet's Redis cannot be reached to place '{model}': {exc}") from exc

    def options(self, model: str) -> list[HostOption]:
        out = []
        for name, record in self.hosts.items():
            entry = record.models.get(model)
            if entry is None:
                continue
            loading = entry.load.state is LoadState.LOADING or any(
                w.model == model and w.state is not WorkerState.FAILED for w in record.workers
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

    async def ask_load(self, host: str, model: str) -> None:
        """Ask another host's gateway to load a model (it asks its loader)."""
        record = self.hosts.get(host)
        if record is None or self._session is None:
            raise FleetUnavailable(f"host {host} is not in the fleet")
        try:
            async with self._session.post(
                record.url + "/v1/ssw/fleet/load",
                json={"model": model},
                headers={TOKEN_HEADER.decode(): self.token},
                timeout=aiohttp.ClientTimeout(total=30),
            ) as resp:
                if resp.status >= 400:
                    body = await resp.json(content_type=None)
                    err = body.get("error", {}) if isinstance(body, dict) else {}
                    raise FleetUnavailable(f"host {host} cannot load '{model}': {err.get('message', resp.status)}")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise FleetUnavailable(f"host {host} cannot be reached to load '{model}': {exc}") from exc


def _redacted(url: str | None) -> str:
    """A Redis URL without its password, for logs."""
    if not url or "@" not in url:
        return url or ""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
