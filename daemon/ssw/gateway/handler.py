"""The gateway role: the OpenAI-compatible API on the public port.

A request passes admission (:mod:`ssw.gateway.admission`), is resolved by name or
alias against the loader's pushed snapshot, finds a ready worker (or is held
while its model loads, or answered 202 or 503, as ``gateway.not_loaded`` and
the request say), and is relayed to the worker (:mod:`ssw.gateway.relay`); what it did
is accounted for once it is answered (:mod:`ssw.gateway.accounting`). The gateway
never starts units itself: loads are asked of the loader.

The proxy routes are served by a plain ASGI handler; FastAPI serves the rest
(/health, /v1/models) and publishes the OpenAPI document for all of them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import generate_latest
from starlette.routing import Match

from ssw import __version__
from ssw.common import http_errors, redis_sink, tasks
from ssw.common.auth import ApiKey, KeyRing
from ssw.common.contract import ModelView, Snapshot, WorkerView
from ssw.common.routes import RESPONSE_ID, ROUTES, Body, Family, Route, match
from ssw.common.states import ASLEEP, LIVE, Failure, LoadState, WorkerState
from ssw.config import Config
from ssw.errors import (
    BadRequest,
    ClientLeft,
    LoaderUnavailable,
    LoadFailed,
    ModelLoading,
    ModelNotFound,
    NoCapacity,
    NotServed,
    PayloadTooLarge,
    RequestTimeout,
    ResponseNotFound,
    SswError,
    UpstreamError,
)
from ssw.gateway import hops
from ssw.gateway.accounting import Accounting, Exchange
from ssw.gateway.admission import ANTHROPIC_ROLES, CHAT_ROLES, Admission, parse_body
from ssw.gateway.fleet import LOAD_PATH, FleetUnavailable, FleetView, fleet_redis, warn_if_insecure
from ssw.gateway.forms import Form, parse_form
from ssw.gateway.loader_client import LoaderClient
from ssw.gateway.metrics import CONTENT_TYPE, GatewayMetrics, label_host, pool_registry
from ssw.gateway.pool import GatewayPool
from ssw.gateway.relay import Receive, Relay, Reply, Send, Unreached
from ssw.gateway.response_book import Holder, ResponseBook
from ssw.gateway.waitqueue import VLLM_PRIORITY, WaitQueue, parse_priority
from ssw.loader.models.registry import valid_name

log = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER_S = 60  # when a model has never loaded here
LOADER_RETRY_S = 0.5  # how often a load is asked for again while the loader cannot be reached
DEFAULT_WAKE_S = 5  # a sleeping model that never woke here: vLLM wakes in about a second
WAIT_HEADER = b"x-ssw-wait"
PRIORITY_HEADER = b"x-ssw-priority"
FALLBACK_HEADER = b"x-ssw-fallback"
FALLBACK_FROM_HEADER = b"x-ssw-fallback-from"
ASYNC_HEADER = b"x-ssw-async"
# Where a request that ssw itself makes (a batch line, an async job) carries its
# caller: a key in the ASGI scope, which no HTTP client can set.
INTERNAL = "ssw.internal"
HOP = "ssw.hop"  # a request another host's gateway sent here: served by this host only
FORWARD_HEADERS = (b"accept", b"x-request-id")
SOURCE = "ssw-gateway"
# Query parameters of a retrieve that reach the worker (re-encoded, never passed raw).
RETRIEVE_PARAMS = ("stream", "starting_after", "include[]")


FLEET_LISTENER = "ssw.fleet_listener"  # set on requests that came in on the fleet listener
MAX_HOSTS_TRIED = 3  # hosts of the fleet a request is offered to before it fails


@dataclass(frozen=True, slots=True)
class Placed:
    """A load this gateway's waiters wait for on another host."""

    host: str
    key: str  # the API key's name it was asked for
    priority: str
    # When that host's load record entered the state it had as it accepted (its clock):
    # a later change to idle, with no worker, is that load ending without one.
    since: float


def _remote_worker(host: str, model: str, url: str) -> WorkerView:
    """Another host's gateway, as a worker of ``model`` (its socket a URL)."""
    return WorkerView(unit=f"{host}/{model}", model=model, replica=1, state=WorkerState.READY, gpus=[], socket=url)


def remote_host(worker: WorkerView) -> str | None:
    """The host whose gateway ``worker`` is; None: a worker of this host."""
    if worker.socket.startswith(("http://", "https://")):
        return worker.unit.split("/", 1)[0]
    return None


def _target(scope: dict[str, Any]) -> str:
    """The request's path and query, as signed in a hop's claim."""
    query = scope.get("query_string", b"")
    return scope["path"] + ("?" + query.decode("latin-1") if query else "")


@dataclass(frozen=True, slots=True)
class Internal:
    """A request the asynchronous tier runs on behalf of an API key (None: auth off)."""

    key: ApiKey | None


@dataclass(slots=True)
class Answer:
    """A whole answer to a request ssw made itself."""

    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


def _truthy(value: bytes | None) -> bool | None:
    if value is None:
        return None
    return value.strip().lower() in (b"1", b"true", b"yes")


class Names:
    """Names, aliases and workers as of one snapshot (and, in a fleet, the other
    hosts' latest records), indexed for the hot path."""

    def __init__(self, snap: Snapshot, fleet: FleetView | None = None) -> None:
        self.snap = snap
        self.fleet_version = fleet.version if fleet else 0
        # Every model and alias this gateway can serve: this host's first, then those
        # only other hosts of the fleet have.
        self.models: dict[str, ModelView] = dict(snap.models)
        self.aliases: dict[str, str] = dict(snap.aliases)
        # model -> other hosts' gateways that have it ready, as workers (their socket a URL)
        self.remote: dict[str, list[WorkerView]] = {}
        self.hosts: dict[str, dict[str, str]] = {}  # model -> host -> its state there
        if fleet is not None:
            for host, record in sorted(fleet.hosts.items()):
                for name, entry in record.models.items():
                    self.models.setdefault(name, entry)
                for alias, target in record.aliases.items():
                    self.aliases.setdefault(alias, target)
                ready = {w.model for w in record.workers if w.state is WorkerState.READY}
                ready |= {a for w in record.workers if w.state is WorkerState.READY for a in w.adapters}
                present = {w.model for w in record.workers}
                for name in record.models:
                    state = "ready" if name in ready else "loading" if name in present else "unloaded"
                    self.hosts.setdefault(name, {})[host] = state
                    if state == "ready" and host != fleet.host and fleet.reachable(host):
                        self.remote.setdefault(name, []).append(_remote_worker(host, name, record.url))
        self.ready: dict[str, list[WorkerView]] = {}
        self.live: dict[str, list[WorkerView]] = {}
        self.asleep: set[str] = set()
        for w in snap.workers:
            if w.state is WorkerState.READY:
                self.ready.setdefault(w.model, []).append(w)
            if w.state in LIVE:
                self.live.setdefault(w.model, []).append(w)
            if w.state in ASLEEP:
                self.asleep.add(w.model)
        # An adapter is served by the workers of its base that have it loaded, and by
        # no other: never the bare base model in its place.
        for name, entry in snap.models.items():
            if entry.base is not None:
                for table in (self.ready, self.live):
                    holders = [w for w in table.get(entry.base, []) if name in w.adapters]
                    if holders:
                        table[name] = holders

    def resolve(self, name: object) -> str:
        if not isinstance(name, str):
            raise BadRequest("'model' must be a string naming a model or alias")
        models = self.models
        if valid_name(name):
            if name in models:
                return name
            target = self.aliases.get(name)
            if target in models:
                return target
        raise ModelNotFound(name, sorted(models) + sorted(self.aliases))

    def state(self, model: str) -> str:
        """ready, loading, sleeping or unloaded, as /v1/models says."""
        if model in self.ready or model in self.remote:
            return "ready"
        if model not in self.snap.models:
            return "loading" if "loading" in self.hosts.get(model, {}).values() else "unloaded"
        entry = self.snap.models[model]
        if model in self.live or entry.load.state in (LoadState.LOADING, LoadState.BACKING_OFF):
            return "loading"
        return "sleeping" if model in self.asleep else "unloaded"


class Gateway:
    def __init__(self, cfg: Config, loader: LoaderClient) -> None:
        self.cfg = cfg
        self.loader = loader
        self.metrics = GatewayMetrics()
        self.queue = WaitQueue(
            cfg.gateway.max_waiters_per_model, lambda model, depth: self.metrics.waiting.labels(model).set(depth)
        )
        self.keys = KeyRing(cfg.auth.keys_file)
        self.keys.reload()
        self.admission = Admission(cfg, self.keys)
        self.accounting = Accounting(cfg, self.metrics)
        # In a fleet, which host holds each stored response is the fleet's to know.
        self.responses = ResponseBook(
            fleet_redis(cfg.fleet, timeout=0.5) if cfg.fleet.enabled else redis_sink.client(cfg.redis_url),
            cfg.gateway.responses_remember_s,
            cfg.gateway.responses_max,
        )
        self.relay = Relay(cfg, loader.used, self._note_response)
        self._names: Names | None = None
        # model -> (epoch, seq) of the snapshot that reflects its load request
        self._asked: dict[str, tuple[str, int]] = {}
        self._asking: set[str] = set()  # models whose load is being asked for again
        self._tasks: set[asyncio.Task[Any]] = set()
        # Accepts a request sent with X-SSW-Async (the asynchronous tier, when it is on):
        # (key, route, model, body) -> the answer's status, body and headers.
        self.on_async: (
            Callable[[ApiKey | None, Route, str, bytes], Awaitable[tuple[int, bytes, list[tuple[bytes, bytes]]]]] | None
        ) = None
        # In a fleet: the other hosts, and where models load fleet-wide.
        self.fleet = FleetView(cfg.fleet, self._on_fleet) if cfg.fleet.enabled else None
        if self.fleet is not None:
            self.relay.pool.ssl_context = self.fleet.ssl_context()
            warn_if_insecure(cfg.fleet)
            self.metrics.host = self.fleet.host
        # model -> the host its waiters wait on (a load placed on another host)
        self._placed: dict[str, Placed] = {}
        loader.on_snapshot(self._on_snapshot)

    async def close(self) -> None:
        if self.fleet is not None:
            await self.fleet.close()
        await self.relay.pool.close()
        await self.responses.close()

    # --- names ---------------------------------------------------------------------------

    @property
    def names(self) -> Names:
        snap = self.loader.snapshot
        if snap is None:
            raise LoaderUnavailable("the gateway has not reached the loader yet; retry shortly")
        fleet_version = self.fleet.version if self.fleet else 0
        if self._names is None or self._names.snap is not snap or self._names.fleet_version != fleet_version:
            self._names = Names(snap, self.fleet)
        return self._names

    def in_flight(self) -> int:
        return self.relay.in_flight()

    def retry_after(self, model: str) -> int:
        """An honest wait: the model's measured load (or wake) time less what has passed,
        plus what is left of a backoff."""
        entry = self.names.models.get(model)
        if entry is None:
            return DEFAULT_RETRY_AFTER_S
        live = self.names.live.get(model, [])
        if model in self.names.asleep or any(w.state is WorkerState.WAKING for w in live):
            return max(1, math.ceil(entry.wake_seconds or DEFAULT_WAKE_S))
        load_s = entry.load_seconds or DEFAULT_RETRY_AFTER_S
        rec = entry.load
        now = time.time()
        if rec.state is LoadState.BACKING_OFF and rec.deadline:
            return max(1, math.ceil(rec.deadline - now + load_s))
        if rec.state is LoadState.COOLING_DOWN and rec.deadline:
            return max(1, math.ceil(rec.deadline - now))
        if rec.state is LoadState.LOADING and entry.load_seconds:
            return max(1, math.ceil(load_s - (now - rec.since)))
        return max(1, math.ceil(load_s))

    # --- waiting for loads -------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_snapshot(self, snap: Snapshot, restarted: bool) -> None:
        """Release or fail waiters as soon as the loader's news arrives; after a loader
        restart, ask again for the loads they wait for."""
        self._check_waiters(restarted)

    def _on_fleet(self) -> None:
        """News of the fleet: hosts joined or left, its Redis answers or not."""
        assert self.fleet is not None
        self.metrics.fleet_connected.set(1 if self.fleet.connected else 0)
        self.metrics.fleet_hosts.set(len(self.fleet.hosts))
        if self.loader.snapshot is not None:
            self._check_waiters()

    def _check_waiters(self, restarted: bool = False) -> None:
        names = self.names  # the latest snapshot, and nothing older
        snap = names.snap
        for model in self.queue.models():
            # Ready here, or on another host of the fleet (where the fleet placed it, or
            # first): there for all but the hops this host serves itself.
            if model in names.ready or model in names.remote:
                released = self.queue.release(model, here=model in names.ready)
                if released:
                    self._placed.pop(model, None)
                    where = "" if model in names.ready else " on another host"
                    log.info("%s: ready%s; released %d waiting requests", model, where, len(released))
                if self.queue.depth(model) == 0:
                    continue
            if model in self._placed and self._check_placed(model, names):
                continue
            entry = snap.models.get(model)
            if entry is None:
                if model not in names.models:
                    self.queue.fail(model, ModelNotFound(model, sorted(names.models)))
                continue
            if restarted and model not in names.live and entry.load.state is LoadState.IDLE:
                self._ask_again_soon(model)
                continue
            failure = self._failure(model, entry, names)
            if failure is not None:
                self.queue.fail(model, failure)

    def _failure(self, model: str, entry: ModelView, names: Names) -> SswError | None:
        """Why the waiters of a model will not be served, if the snapshot says so."""
        rec = entry.load
        if rec.state is LoadState.COOLING_DOWN:
            return LoadFailed.cooling_down(model, (rec.deadline or 0) - time.time(), rec.last_error or rec.reason)
        if rec.state is LoadState.IDLE and model not in names.live:
            asked = self._asked.get(model)
            if asked is None or asked[0] != names.snap.epoch or names.snap.seq < asked[1]:
                return None  # this snapshot predates the load request
            why = rec.last_error or rec.reason or "no worker came up"
            if rec.reason.startswith(Failure.NO_ROOM.value):
                return NoCapacity(why)
            return LoadFailed(f"loading '{model}' failed: {why}", self.retry_after(model))
        return None

    def _ask_again_soon(self, model: str) -> None:
        if model not in self._asking:
            self._asking.add(model)
            self._spawn(self._ask_again(model))

    async def _ask_again(self, model: str) -> None:
        """Ask the loader for the load its waiters need; while it cannot be reached (it
        is restarting), keep asking as long as anyone waits."""
        try:
            while self.queue.depth(model):
                try:
                    accepted = await self.loader.request_load(model)
                except LoaderUnavailable:
                    await asyncio.sleep(LOADER_RETRY_S)
                    continue
                except SswError as exc:
                    self.queue.fail(model, exc)
                    return
                self._asked[model] = (accepted.epoch, accepted.seq)
                return
        finally:
            self._asking.discard(model)

    async def workers_for(
        self, model: str, mode: str, priority: str, reply: Reply, stream: bool, hop: bool = False, key: str = ""
    ) -> list[WorkerView]:
        """The model's ready workers: this host's, else (in a fleet) other hosts' gateways
        that have it ready. While it is ready nowhere, start its load where the fleet
        decides (here without a fleet) and hold the request (mode 'wait'), or raise
        ModelLoading for a 202 or 503 answer. A request another host sent here (``hop``)
        is served by this host's workers only."""
        names = self.names
        workers = names.ready.get(model)
        if workers:
            return workers
        if not hop:
            remote = names.remote.get(model)
            if remote:
                return remote
        # Batch work (mode 'batch': never held) never places loads on other hosts: the
        # runner loads only here, and only without evicting a model in interactive use.
        if not hop and mode != "batch":
            for _ in range(MAX_HOSTS_TRIED):
                target = await self._fleet_target(model, names)
                if target is None:
                    break
                try:
                    return await self._hold_remote(model, target, mode, priority, reply, stream, key)
                except FleetUnavailable:
                    if self.fleet is None or self.fleet.reachable(target):
                        raise
                    names = self.names  # it cannot be reached from here: placed again without it
        entry = names.snap.models.get(model)
        if entry is None:
            raise ModelNotFound(model, sorted(names.snap.models))
        rec = entry.load
        if rec.state is LoadState.COOLING_DOWN:
            failure = self._failure(model, entry, names)
            assert failure is not None
            raise failure
        reask = False
        if rec.state is LoadState.IDLE and model not in names.live:
            try:
                accepted = await self.loader.request_load(model)
            except LoaderUnavailable:
                if mode != "wait":
                    raise
                reask = True  # held, and asked again once the loader is back (a restart takes seconds)
            else:
                self._asked[model] = (accepted.epoch, accepted.seq)
        else:
            self._asked.setdefault(model, (names.snap.epoch, names.snap.seq))
        retry = self.retry_after(model)
        if mode != "wait":
            raise ModelLoading(f"model '{model}' is loading", retry)
        await self._hold(model, priority, retry, reply, stream, self._ask_again_soon if reask else None, here_only=hop)
        names = self.names
        # Released when the model became ready here, or first on another host of the fleet.
        workers = names.ready.get(model) or (None if hop else names.remote.get(model))
        if not workers:
            raise UpstreamError(f"model '{model}' was ready but its worker is gone again; retry")
        return workers

    async def _hold(
        self,
        model: str,
        priority: str,
        retry: int,
        reply: Reply,
        stream: bool,
        then: Callable[[str], None] | None = None,
        here_only: bool = False,
    ) -> None:
        """Wait until the model's waiters are released (or failed, or time out)."""
        waiter = self.queue.add(model, priority, retry, here_only)
        if then is not None:
            then(model)
        self._check_waiters()  # it may have become ready (or failed) meanwhile
        keepalive = self._spawn_keepalive(reply) if stream else None
        # A client that leaves while held is dropped: its place in the queue too.
        left = asyncio.ensure_future(reply.client_left())
        try:
            async with asyncio.timeout(self.cfg.gateway.wait_timeout_s):
                await asyncio.wait([waiter.future, left], return_when=asyncio.FIRST_COMPLETED)
            if not waiter.future.done():
                self.queue.discard(waiter)
                raise ClientLeft(f"the client left while '{model}' loaded")
            waiter.future.result()
        except TimeoutError:
            self.queue.discard(waiter)
            raise ModelLoading(
                f"model '{model}' did not become ready within {self.cfg.gateway.wait_timeout_s:.0f} s",
                self.retry_after(model),
            ) from None
        except asyncio.CancelledError:
            self.queue.discard(waiter)
            raise
        finally:
            await tasks.cancel(keepalive)
            await tasks.cancel(left)

    # --- the fleet ------------------------------------------------------------------------------

    async def _fleet_target(self, model: str, names: Names) -> str | None:
        """Another host that loads the model, as decided fleet-wide; None: this one."""
        fleet = self.fleet
        if fleet is None:
            return None
        placed_on = self._placed.get(model)
        placed = placed_on.host if placed_on is not None else None
        if placed is not None and fleet.reachable(placed):
            record = fleet.hosts.get(placed)
            entry = record.models.get(model) if record else None
            if (
                record is not None
                and entry is not None
                and (entry.load.state is not LoadState.IDLE or any(w.model == model for w in record.workers))
            ):
                return placed  # its load is under way there
            self._placed.pop(model, None)  # done, failed or never begun: decided again
        local = names.snap.models.get(model)
        if local is not None and (
            model in names.live or model in names.asleep or local.load.state is not LoadState.IDLE
        ):
            return None  # already loading, waking or backing off here
        try:
            host = await fleet.place(model)
        except FleetUnavailable:
            if local is not None:
                return None  # the fleet cannot decide: this host serves what it has
            raise
        return None if host == fleet.host else host

    async def _hold_remote(
        self, model: str, host: str, mode: str, priority: str, reply: Reply, stream: bool, key: str
    ) -> list[WorkerView]:
        assert self.fleet is not None
        placed = self._placed.get(model)
        if placed is None or placed.host != host:
            since = await self.fleet.ask_load(host, model, key, priority)
            self._placed[model] = Placed(host, key, priority, since)
        retry = self._remote_retry_after(model, host)
        if mode != "wait":
            raise ModelLoading(f"model '{model}' is loading on host {host}", retry)
        await self._hold(model, priority, retry, reply, stream)
        names = self.names
        workers = names.ready.get(model) or names.remote.get(model)
        if not workers:
            raise UpstreamError(f"model '{model}' was ready but its worker is gone again; retry")
        return workers

    def _remote_retry_after(self, model: str, host: str) -> int:
        record = self.fleet.hosts.get(host) if self.fleet else None
        entry = record.models.get(model) if record else None
        return max(1, math.ceil((entry.load_seconds if entry else None) or DEFAULT_RETRY_AFTER_S))

    def _check_placed(self, model: str, names: Names) -> bool:
        """For waiters of a load on another host: whether that host is still on it. Gone
        or unreachable from here: the load is placed again. Its load ended without a
        worker (no room, cancelled there, failed): the waiters fail with its reason."""
        placed = self._placed[model]
        host = placed.host
        fleet = self.fleet
        record = fleet.hosts.get(host) if fleet else None
        if record is None or (fleet is not None and not fleet.reachable(host)):
            why = "is gone" if record is None else "cannot be reached from here"
            log.warning("%s: host %s, which was loading it, %s; placing it again", model, host, why)
            del self._placed[model]
            self._spawn(self._place_again(model, placed))
            return True
        entry = record.models.get(model)
        if entry is None:
            return True
        rec = entry.load
        failure: SswError | None = None
        if rec.state is LoadState.COOLING_DOWN:
            failure = LoadFailed(f"loading '{model}' on host {host} failed: {rec.last_error}", self.retry_after(model))
        elif (
            rec.state is LoadState.IDLE
            and rec.since > placed.since
            and not any(w.model == model and w.state is not WorkerState.FAILED for w in record.workers)
        ):
            # Its load there ended, and no worker came of it.
            why = rec.last_error or rec.reason or "no worker came up"
            if rec.reason.startswith(Failure.NO_ROOM.value):
                failure = NoCapacity(f"host {host} has no room for '{model}': {why}")
            else:
                failure = LoadFailed(f"loading '{model}' on host {host} ended without a worker: {why}", 1)
        if failure is not None:
            del self._placed[model]
            self.queue.fail(model, failure)
        return True

    async def _place_again(self, model: str, placed: Placed) -> None:
        try:
            host = await self._fleet_target(model, self.names)
            if host is None:
                accepted = await self.loader.request_load(model)
                self._asked[model] = (accepted.epoch, accepted.seq)
            else:
                since = await self.fleet.ask_load(host, model, placed.key, placed.priority)  # type: ignore[union-attr]
                self._placed[model] = Placed(host, placed.key, placed.priority, since)
        except SswError as exc:
            self.queue.fail(model, exc)

    def _spawn_keepalive(self, reply: Reply) -> asyncio.Task[None]:
        async def beat() -> None:
            interval = self.cfg.gateway.keepalive_s
            await asyncio.sleep(interval)
            # Held this long: start the event stream, so that proxies and clients see life.
            if not reply.started:
                await reply.start_sse()
            while True:
                await reply.body(b": ssw: waiting for the model to load\n\n")
                await asyncio.sleep(interval)

        return asyncio.ensure_future(beat())

    def not_loaded_mode(self, key: ApiKey | None, wait_header: bool | None, sdk: bool) -> str:
        """wait, accept or unavailable: X-SSW-Wait first, then the key's setting, then
        gateway.not_loaded. An official OpenAI SDK reads any 2xx as a completion (a
        202 became one without choices, a stream with no chunk), so where the answer
        would be 'accept' it gets the same news as a 503 with Retry-After, which the
        SDKs retry honouring the header."""
        mode = (key.not_loaded if key else None) or self.cfg.gateway.not_loaded
        if wait_header is True:
            return "wait"
        if wait_header is False and mode == "wait":
            mode = "unavailable"
        if mode == "accept" and sdk:
            return "unavailable"
        return mode

    async def _serve_or_fallback(
        self,
        key: ApiKey | None,
        model: str,
        body: dict[str, Any],
        route: Route,
        mode: str,
        priority: str,
        fallback: bool | None,
        reply: Reply,
        stream: bool,
        hop: bool = False,
    ) -> tuple[str, list[WorkerView], str | None]:
        """(model that serves, its workers, the model it stands in for or None)."""
        try:
            key_name = key.name if key else ""
            return model, await self.workers_for(model, mode, priority, reply, stream, hop, key_name), None
        except (LoadFailed, NoCapacity, FleetUnavailable) as exc:
            names = self.names
            entry = names.models.get(model)
            allowed = fallback if fallback is not None else bool(entry and entry.fallback_default)
            if entry is None or not allowed or not route.fallbacks:
                raise
            in_scope = self.admission.allowed_models(key, names.resolve)
            for candidate in entry.fallbacks:
                candidate_entry = names.models.get(candidate)
                workers = names.ready.get(candidate) or (None if hop else names.remote.get(candidate))
                if candidate_entry is None or not workers or route.family not in candidate_entry.capabilities:
                    continue
                if in_scope is not None and candidate not in in_scope:
                    continue  # a fallback never widens what the key may use
                try:
                    self.admission.validate(body, route, candidate_entry.max_tokens)
                except BadRequest:
                    continue  # nor the limits the fallback has
                log.info("%s cannot serve (%s); falling back to %s", model, exc.message, candidate)
                return candidate, workers, model
            raise

    # --- the proxy routes --------------------------------------------------------------------

    async def proxy(
        self, scope: dict[str, Any], receive: Receive, send: Send, route: Route, response_id: str | None
    ) -> None:
        ex = Exchange(route=route.path)
        reply = Reply(send, receive)
        reply.dialect = route.dialect
        try:
            if route.body is Body.NONE:
                await self._by_response(scope, receive, reply, ex, route, response_id or "")
            else:
                await self._proxy(scope, receive, reply, ex, route)
        except SswError as exc:
            ex.status, ex.error = exc.status, exc.code or exc.type
            if isinstance(exc, ModelLoading) and exc.accepted:
                await reply.whole(202, orjson.dumps(exc.accepted), [(b"retry-after", b"%d" % exc.retry_after_s)])
                ex.status = 202
            elif not reply.ended:
                await reply.error(exc, SOURCE)
        except Exception:
            log.exception("unhandled error in the gateway")
            ex.status, ex.error = 500, "internal_error"
            if not reply.started:
                await reply.error(SswError("internal error in ssw; see its journal"), SOURCE)
        finally:
            self.admission.release(ex)
            self.accounting.finish(ex)

    async def execute(self, key: ApiKey | None, route: Route, body: bytes, priority: str = "batch") -> Answer:
        """Run one request on behalf of ``key`` exactly as the public route would (the
        same admission rules, fallbacks, relay and accounting), and return its whole
        answer. A model that is not ready is a 503, never a wait or a load."""
        answer = Answer()
        scope = {
            "type": "http",
            "method": "POST",
            "path": route.path,
            "query_string": b"",
            "headers": [(b"content-length", b"%d" % len(body)), (PRIORITY_HEADER, priority.encode())],
            INTERNAL: Internal(key),
        }
        sent = False
        parts: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Future()  # no disconnect: the runner waits for the whole answer
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer.status = message["status"]
                answer.headers = list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))

        await self.proxy(scope, receive, send, route, None)
        answer.body = b"".join(parts)
        return answer

    def _admit(self, scope: dict[str, Any], ex: Exchange) -> tuple[ApiKey | None, dict[bytes, bytes]]:
        headers: dict[bytes, bytes] = dict(scope["headers"])
        internal: Internal | None = scope.get(INTERNAL)
        if internal is not None:
            # Authenticated when it was submitted; its concurrency is the runner's to bound.
            key = internal.key
        elif scope.get(FLEET_LISTENER) or hops.HEADER in headers:
            # Another host's gateway, for a client it authenticated: its signed claim names
            # the key, which this host looks up itself and holds to its scope and limits.
            claim = self._hop_claim(scope, headers)
            key = self._claimed_key(claim)
            self.admission.admit(key, ex)  # that key's in-flight limit, counted on this host
            scope[HOP] = claim
            ex.key, ex.priority = claim.key, parse_priority(claim.priority)
            return key, headers
        else:
            key = self.admission.authenticate(scope["headers"])
            self.admission.admit(key, ex)
        ex.key = key.name if key else ""
        ex.priority = parse_priority(headers[PRIORITY_HEADER].decode("latin-1") if PRIORITY_HEADER in headers else None)
        return key, headers

    def _hop_claim(self, scope: dict[str, Any], headers: dict[bytes, bytes]) -> hops.Claim:
        if not scope.get(FLEET_LISTENER) or self.fleet is None:
            raise hops.BadClaim("fleet claims are taken only on the fleet listener, never on the public port")
        header = headers.get(hops.HEADER)
        if header is None:
            raise hops.BadClaim("the fleet listener serves only hops, each with a claim signed by the fleet")
        return self.fleet.check(header, scope["method"], _target(scope))

    def _resolve_in_scope(self, key: ApiKey | None, asked: object, names: Names) -> str:
        """The model ``asked`` names, within the key's scope. Outside it the answer is the
        same 403 whether or not the model exists."""
        try:
            resolved: str | None = names.resolve(asked)
        except (ModelNotFound, BadRequest):
            resolved = None
        self.admission.check_scope(key, asked if isinstance(asked, str) else "", resolved, names.resolve)
        return names.resolve(asked)

    def _claimed_key(self, claim: hops.Claim) -> ApiKey | None:
        if not self.cfg.auth.enabled:
            return None
        key = self.keys.named(claim.key)
        if key is None:
            raise hops.BadClaim(f"the fleet claim names API key {claim.key[:64]!r}, which this host does not know")
        return key

    def _hop_head(
        self,
        worker: WorkerView,
        method: bytes,
        target: bytes,
        payload: bytes,
        headers: dict[bytes, bytes],
        content_type: bytes,
        ex: Exchange,
        wait: bool,
    ) -> bytes:
        """The head of a request to ``worker``: a local worker's, or another host's gateway's
        with the claim that carries the client's key name, priority, wait and fallback."""
        extra: list[tuple[bytes, bytes]] = []
        host = remote_host(worker)
        if host is not None and self.fleet is not None:
            fallback = _truthy(headers.get(FALLBACK_HEADER))
            claim = self.fleet.claim(
                host, ex.key, ex.priority, wait, fallback, method.decode(), target.decode("latin-1"), payload
            )
            extra.append((hops.HEADER, claim))
        return _request_head(method, target, payload, headers, content_type, extra)

    async def _proxy(self, scope: dict[str, Any], receive: Receive, reply: Reply, ex: Exchange, route: Route) -> None:
        key, headers = self._admit(scope, ex)
        multipart = route.body is Body.MULTIPART
        raw = await self.admission.read_body(
            headers.get(b"content-length"),
            _body(receive),
            self.cfg.limits.max_upload_bytes if multipart else self.cfg.limits.max_body_bytes,
        )
        form: Form | None = None
        if multipart:
            form = parse_form(raw, headers.get(b"content-type"))
            body: dict[str, Any] = {"model": form.value("model")}
            if (stream_field := form.value("stream")) is not None:
                body["stream"] = stream_field.strip().lower() == "true"
        else:
            body = parse_body(raw, self.cfg.limits.max_json_depth)
        claim: hops.Claim | None = scope.get(HOP)
        if claim is not None:
            hops.check_body(claim, raw)
        if body.get("model") is None:
            raise BadRequest("'model' is required")
        ex.stream = stream = body.get("stream") is True
        names = self.names
        asked = body["model"]
        model = self._resolve_in_scope(key, asked, names)
        ex.model = model
        entry = names.models[model]
        if route.family not in entry.capabilities:
            raise NotServed(
                f"'{model}' does not serve {route.path}: it serves {', '.join(entry.capabilities) or 'nothing'}"
                " (GET /v1/models lists what each model can do)"
            )
        self.admission.validate(body, route, entry.max_tokens)
        if self.on_async is not None and scope.get(INTERNAL) is None and _truthy(headers.get(ASYNC_HEADER)):
            if multipart or stream:
                raise BadRequest("X-SSW-Async takes a JSON request that does not stream")
            await reply.whole(*await self.on_async(key, route, model, raw))
            ex.status = 202
            return
        previous = body.get("previous_response_id") if route.family is Family.RESPONSES else None
        ex.capture_id = route.path == "/v1/responses" and body.get("store") is not False
        if previous is not None:
            # Continuing a stored response: only the worker that holds it can (on this host,
            # or through the gateway of the host that holds it).
            holder = await self._holder(previous, key)
            if holder.model != model:
                raise BadRequest(f"previous_response_id belongs to model '{holder.model}', not '{model}'")
            worker = self._holding_worker(holder, previous)
            payload = self._payload(body, raw, route, model, ex, asked)
            head = self._hop_head(worker, b"POST", route.path.encode(), payload, headers, b"application/json", ex, True)
            await self.relay.forward(model, head, payload, [worker], ex, reply, receive)
            return
        sdk = any(name.startswith(b"x-stainless-") for name in headers)
        # Work ssw runs itself is never held: the runner decides when a model is worth a load.
        if scope.get(INTERNAL) is not None:
            mode = "batch"
        elif claim is not None:
            mode = "wait" if claim.wait else "unavailable"
        else:
            mode = self.not_loaded_mode(key, _truthy(headers.get(WAIT_HEADER)), sdk)
        # A hop never falls back on the far side: the first host applied the key's fallbacks.
        fallback = False if claim is not None else _truthy(headers.get(FALLBACK_HEADER))
        # Each host that cannot be reached is passed over, then the next, then a load here.
        for _ in range(MAX_HOSTS_TRIED):
            try:
                served, workers, stands_in_for = await self._serve_or_fallback(
                    key, model, body, route, mode, ex.priority, fallback, reply, stream, claim is not None
                )
            except ModelLoading as exc:
                if mode == "accept" and not reply.started:
                    exc.accepted = {
                        "object": "ssw.model_loading",
                        "model": model,
                        "status": "loading",
                        "message": exc.message,
                        "retry_after_s": exc.retry_after_s,
                    }
                raise
            ex.model = served
            if form is not None:
                # The form goes through as sent, with the model's own name for an alias.
                payload = raw if asked == served else form.with_value("model", served)
                content_type = headers.get(b"content-type", b"")
            else:
                payload = self._payload(body, raw, route, served, ex, asked)
                content_type = b"application/json"
            host = remote_host(workers[0])
            if host is not None:
                workers = self.relay.order(served, workers)[:1]  # the claim is for one host
            head = self._hop_head(workers[0], b"POST", route.path.encode(), payload, headers, content_type, ex,
                                  mode == "wait")  # fmt: skip
            if stands_in_for is not None and not reply.started:
                reply.extra_headers.append((FALLBACK_FROM_HEADER, stands_in_for.encode()))
            try:
                await self.relay.forward(served, head, payload, workers, ex, reply, receive, remote=host is not None)
                return
            except Unreached as exc:
                if host is None or self.fleet is None:
                    raise
                self.fleet.unreachable(host, exc.message)
        raise UpstreamError(f"no host of the fleet that has '{model}' could be reached")

    async def _by_response(
        self, scope: dict[str, Any], receive: Receive, reply: Reply, ex: Exchange, route: Route, response_id: str
    ) -> None:
        """Retrieve or cancel a stored response: at the worker that holds it (through its
        host's gateway, in a fleet), or a 404."""
        key, headers = self._admit(scope, ex)
        raw = await self.admission.read_body(headers.get(b"content-length"), _body(receive))  # none is expected
        claim: hops.Claim | None = scope.get(HOP)
        if claim is not None:
            hops.check_body(claim, raw)
        holder = await self._holder(response_id, key)
        worker = self._holding_worker(holder, response_id)
        ex.model = holder.model
        path = scope["path"].encode()  # its id matched RESPONSE_ID
        if route.method == "GET":
            query = urllib.parse.parse_qsl(scope.get("query_string", b"").decode("latin-1"))
            kept = [(k, v) for k, v in query if k in RETRIEVE_PARAMS]
            ex.stream = any(k == "stream" and v.lower() == "true" for k, v in kept)
            if kept:
                path += b"?" + urllib.parse.urlencode(kept).encode()
        head = self._hop_head(worker, route.method.encode(), path, b"", headers, b"application/json", ex, False)
        await self.relay.forward(
            holder.model, head, b"", [worker], ex, reply, receive, remote=remote_host(worker) is not None
        )

    async def _holder(self, response_id: object, key: ApiKey | None) -> Holder:
        """Who holds a stored response the caller may see; the same 404 for one that
        does not exist, belongs to another key, or to a model outside the key's scope."""
        missing = ResponseNotFound(f"No response found with id '{str(response_id)[:80]}'.")
        if not isinstance(response_id, str) or not RESPONSE_ID.match(response_id):
            raise missing
        holder = await self.responses.find(response_id)
        if holder is None or (self.cfg.auth.enabled and holder.key != (key.name if key else "")):
            raise missing
        names = self.names
        allowed = self.admission.allowed_models(key, names.resolve)
        if holder.model not in names.models or (allowed is not None and holder.model not in allowed):
            raise missing
        return holder

    def _holding_worker(self, holder: Holder, response_id: str) -> WorkerView:
        if self.fleet is not None and holder.host and holder.host != self.fleet.host:
            record = self.fleet.hosts.get(holder.host)
            if record is not None and self.fleet.reachable(holder.host):
                # Held on another host: its gateway relays it (and checks the owner again).
                return _remote_worker(holder.host, holder.model, record.url)
            raise ResponseNotFound(
                f"Response '{response_id}' is held on host {holder.host}, which cannot be reached from here now."
            )
        for worker in self.names.ready.get(holder.model, ()):
            if worker.unit == holder.unit:
                return worker
        raise ResponseNotFound(
            f"Response '{response_id}' was held by {holder.unit}, which no longer serves; a stored response "
            "lives in its worker's memory and ends with it."
        )

    async def _note_response(self, ex: Exchange, response_id: str) -> None:
        # Relayed from another host's gateway: that host notes it (its worker holds it).
        if RESPONSE_ID.match(response_id) and ex.worker and "/" not in ex.worker:
            host = self.fleet.host if self.fleet is not None else ""
            await self.responses.remember(response_id, Holder(ex.model, ex.worker, ex.key, host))

    def _payload(
        self, body: dict[str, Any], raw: bytes, route: Route, served: str, ex: Exchange, asked: object
    ) -> bytes:
        """The body the worker gets: the client's bytes unless ssw had to change something."""
        changed = asked != served
        body["model"] = served
        if ex.stream and route.usage_chunk:
            options = body.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage")):
                # Token counts come from vLLM's usage chunk; the client did not
                # ask for it, so it is taken out of their stream again.
                body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
                ex.strip_usage = changed = True
        # (a model only another host of the fleet has is in the fleet's names, not this snapshot)
        entry = self.names.models[served]
        if route.family is Family.CHAT and entry.chat_template_kwargs:
            kwargs = body.get("chat_template_kwargs")
            kwargs = dict(kwargs) if isinstance(kwargs, dict) else {}
            for name, value in entry.chat_template_kwargs.items():
                if name not in kwargs:
                    kwargs[name] = value
                    changed = True
            body["chat_template_kwargs"] = kwargs
        if entry.scheduling_policy == "priority" and route.takes_priority and "priority" not in body:
            body["priority"] = VLLM_PRIORITY[ex.priority]
            changed = True
        return orjson.dumps(body) if changed else raw


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("the client left before sending its whole body")
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


def _request_head(
    method: bytes,
    path: bytes,
    payload: bytes,
    headers: dict[bytes, bytes],
    content_type: bytes,
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> bytes:
    lines = [
        method + b" " + path + b" HTTP/1.1",
        b"host: localhost",
        b"content-type: " + content_type,
        b"content-length: %d" % len(payload),
    ]
    for name in FORWARD_HEADERS:
        value = headers.get(name)
        if value is not None:
            lines.append(name + b": " + value)
    lines += [name + b": " + value for name, value in extra]
    return b"\r\n".join(lines) + b"\r\n\r\n"


# --- the apps ------------------------------------------------------------------------------------

# The request bodies ssw reads; every other field passes through to vLLM, so
# the schemas allow additional properties. Published at /openapi.json.
_MODEL = {"type": "string", "description": "A model name or alias."}
_MAX_TOKENS = {"type": "integer", "minimum": 1}


def _messages(roles: Iterable[str]) -> dict[str, Any]:
    """A non-empty list of messages with one of these roles (chat's and Anthropic's differ)."""
    item = {
        "type": "object",
        "required": ["role"],
        "properties": {"role": {"type": "string", "enum": list(roles)}, "content": {}},
    }
    return {"type": "array", "minItems": 1, "items": item}


REQUEST_SCHEMAS: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            "model": _MODEL,
            "messages": _messages(CHAT_ROLES),
            "max_tokens": _MAX_TOKENS,
            "max_completion_tokens": _MAX_TOKENS,
            "stream": {"type": "boolean"},
        },
    },
    "/v1/completions": {
        "type": "object",
        "required": ["model", "prompt"],
        "properties": {"model": _MODEL, "prompt": {}, "max_tokens": _MAX_TOKENS, "stream": {"type": "boolean"}},
    },
    "/v1/embeddings": {
        "type": "object",
        "required": ["model", "input"],
        "properties": {"model": _MODEL, "input": {}},
    },
    "/v1/responses": {
        "type": "object",
        "required": ["model", "input"],
        "properties": {
            "model": _MODEL,
            "input": {},
            "previous_response_id": {"type": "string"},
            "max_output_tokens": _MAX_TOKENS,
            "stream": {"type": "boolean"},
        },
    },
    "/v1/messages": {
        "type": "object",
        "required": ["model", "messages", "max_tokens"],
        "properties": {
            "model": _MODEL,
            "messages": _messages(ANTHROPIC_ROLES),
            "max_tokens": _MAX_TOKENS,
            "stream": {"type": "boolean"},
        },
    },
    "/detokenize": {
        "type": "object",
        "required": ["model", "tokens"],
        "properties": {"model": _MODEL, "tokens": {"type": "array", "items": {"type": "integer"}}},
    },
}
_ERROR = {"description": "An OpenAI error envelope.", "content": {"application/json": {"schema": {"type": "object"}}}}


_FORM = {
    "type": "object",
    "required": ["model", "file"],
    "properties": {"model": _MODEL, "file": {"type": "string", "format": "binary"}, "stream": {"type": "boolean"}},
}


def _openapi(route: Route) -> dict[str, Any]:
    header = {"in": "header", "required": False, "schema": {"type": "string"}}
    parameters: list[dict[str, Any]] = [
        {**header, "name": "Authorization", "description": "Bearer <API key> (or x-api-key: <API key>)"},
        {
            **header,
            "name": "X-SSW-Priority",
            "schema": {"type": "string", "enum": ["realtime", "interactive", "batch"]},
        },
    ]
    doc: dict[str, Any] = {"parameters": parameters}
    if route.body is Body.NONE:
        parameters.append({"in": "path", "name": "response_id", "required": True, "schema": {"type": "string"}})
    else:
        parameters += [
            {**header, "name": "X-SSW-Wait", "description": "true: hold the request while the model loads"},
            {**header, "name": "X-SSW-Fallback", "description": "true: a fallback model may answer"},
        ]
        if route.body is Body.MULTIPART:
            content = {"multipart/form-data": {"schema": _FORM}}
        else:
            schema = REQUEST_SCHEMAS.get(
                route.path, {"type": "object", "required": ["model"], "properties": {"model": _MODEL}}
            )
            content = {"application/json": {"schema": schema}}
        doc["requestBody"] = {"required": True, "content": content}
    doc["responses"] = {
        "200": {"description": "The worker's answer (JSON, or server-sent events when streaming)."},
        "202": {"description": "The model is loading; retry after Retry-After seconds (not_loaded: accept)."},
        **{code: _ERROR for code in ("400", "401", "403", "404", "408", "413", "422", "429", "431", "503")},
    }
    return doc


# FastAPI's routes that anyone may call: the rest need a key before their body is read.
# (The fleet's load route checks its own credential before it reads a byte.)
OPEN_PATHS = frozenset({"/health", "/openapi.json", "/metrics", LOAD_PATH})
UPLOAD_PATH = "/v1/files"
FORM_SLACK = 64 * 1024  # the multipart form around an uploaded file


class GatewayApp:
    """The public ASGI app: the proxy routes go straight to the gateway's handler,
    everything else to FastAPI, behind a key check and a bounded body."""

    def __init__(self, gw: Gateway, api: FastAPI) -> None:
        self.gw = gw
        self.api = api

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            found = match(scope["method"], scope["path"])
            if found is not None:
                await self.gw.proxy(scope, receive, send, *found)
                return
            try:
                receive = self._guard(scope, receive)
            except SswError as exc:
                await Reply(send).error(exc, SOURCE)
                return
        # Everything else, vLLM's control and development paths included, is FastAPI's 404.
        await self.api(scope, receive, send)

    def _guard(self, scope: dict[str, Any], receive: Receive) -> Receive:
        """Authenticate before any body is read (on routes that exist: any other path
        is the same 404 for everyone), and cap the body in size and time."""
        limits = self.gw.cfg.limits
        if scope["path"] not in OPEN_PATHS and self._routed(scope):
            self.gw.admission.authenticate(scope["headers"])
        if scope["method"] == "POST" and scope["path"] == UPLOAD_PATH:
            limit = self.gw.cfg.batch.max_file_bytes + FORM_SLACK
            timeout = limits.body_timeout_s + limit / limits.min_body_rate_bytes_s
        else:
            limit, timeout = limits.max_body_bytes, limits.body_timeout_s
        return bounded_body(receive, dict(scope["headers"]).get(b"content-length"), limit, timeout)

    def _routed(self, scope: dict[str, Any]) -> bool:
        return any(route.matches(scope)[0] is not Match.NONE for route in self.api.router.routes)


class FleetApp:
    """The fleet listener: the same gateway, for hops from the other hosts' gateways only
    (each with a signed claim), on the fleet's network and over TLS. The public port never
    takes a hop, and this one serves nothing else."""

    def __init__(self, public: GatewayApp) -> None:
        self.public = public

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        scope[FLEET_LISTENER] = True
        if match(scope["method"], scope["path"]) is not None or scope["path"] in (LOAD_PATH, "/health"):
            await self.public(scope, receive, send)
            return
        await Reply(send).error(NotServed(f"the fleet listener serves hops only, not {scope['path'][:80]}"), SOURCE)


def bounded_body(receive: Receive, declared: bytes | None, limit: int, timeout: float) -> Receive:
    """``receive`` that fails (413, 408) once the body passes ``limit`` bytes or has not
    all arrived within ``timeout`` s of the first read; after the body, as it was."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
    size = 0
    deadline: float | None = None
    done = False

    async def read() -> Any:
        nonlocal size, deadline, done
        if done:
            return await receive()  # a disconnect, while the answer is sent
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            raise RequestTimeout(f"the request body did not arrive within {timeout:.0f} s") from None
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise PayloadTooLarge(f"the request body exceeds {limit} bytes")
            done = not message.get("more_body", False)
        return message

    return read


def gateway_app(gw: Gateway) -> GatewayApp:
    app = FastAPI(
        title="ssw OpenAI-compatible API", version=__version__, docs_url=None, redoc_url=None, redirect_slashes=False
    )
    http_errors.install(app, SOURCE)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        loader = gw.loader
        snap = loader.snapshot
        return {
            "status": "ok",
            "loader_connected": loader.connected,
            "loader_epoch": snap.epoch if snap else None,
            "loader_error": loader.last_error,
            "snapshot_age_s": round(time.monotonic() - loader.snapshot_at, 1) if snap else None,
            "workers_ready": sum(1 for w in snap.workers if w.state is WorkerState.READY) if snap else 0,
            "waiting": {m: gw.queue.depth(m) for m in gw.queue.models()},
            "requests_in_flight": gw.in_flight(),
            "fleet": None
            if gw.fleet is None
            else {
                "host": gw.fleet.host,
                "connected": gw.fleet.connected,
                "error": gw.fleet.last_error,
                "hosts": sorted(gw.fleet.hosts),
                # hosts this one could not reach lately, whatever their records say
                "unreachable": sorted(h for h in gw.fleet.hosts if not gw.fleet.reachable(h)),
            },
        }

    @app.post(LOAD_PATH, status_code=202, include_in_schema=False)
    async def fleet_load(request: Request) -> dict[str, Any]:
        """Another host's gateway asks this host to load a model (the fleet decided it
        loads here), for one of its clients: on the fleet listener, with a signed claim."""
        scope: dict[str, Any] = dict(request.scope)
        headers = dict(scope["headers"])
        claim = gw._hop_claim(scope, headers)
        key = gw._claimed_key(claim)
        raw = await gw.admission.read_body(headers.get(b"content-length"), _body(request.receive), 4096)
        hops.check_body(claim, raw)
        body = parse_body(raw, 4)
        names = gw.names
        model = gw._resolve_in_scope(key, body.get("model"), names)
        if model not in names.snap.models:
            raise ModelNotFound(model, sorted(names.snap.models))
        accepted = await gw.loader.request_load(model)
        assert gw.fleet is not None
        return {"model": model, "host": gw.fleet.host, "load": accepted.load.model_dump(mode="json")}

    if gw.cfg.gateway.public_metrics:
        app.add_api_route("/metrics", metrics_endpoint(gw), methods=["GET"], include_in_schema=False)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        key = gw.admission.authenticate(request.headers.raw)
        names = gw.names
        allowed = gw.admission.allowed_models(key, names.resolve)
        data = []
        for name, entry in names.models.items():
            if allowed is not None and name not in allowed:
                continue
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "ssw",
                    "ssw": {
                        "state": names.state(name),
                        "aliases": entry.aliases,
                        "pinned": entry.pinned,
                        "capabilities": entry.capabilities,
                        "capabilities_measured": entry.capabilities_measured,
                        **({"base": entry.base} if entry.base else {}),
                        **({"hosts": names.hosts.get(name, {})} if gw.fleet is not None else {}),
                    },
                }
            )
        for alias, target in names.aliases.items():
            if allowed is not None and target not in allowed:
                continue
            data.append({"id": alias, "object": "model", "created": 0, "owned_by": "ssw", "ssw": {"alias_of": target}})
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    async def documented_only(request: Request) -> Response:
        # GatewayApp serves these paths; the route is here for the OpenAPI document.
        return Response(status_code=405)

    for route in ROUTES:
        path = route.path.replace("{id}", "{response_id}")
        app.add_api_route(
            path,
            documented_only,
            methods=[route.method],
            openapi_extra=_openapi(route),
            summary=f"{route.family.value}: relayed to a worker of the model",
        )

    return GatewayApp(gw, app)


def metrics_endpoint(gw: Gateway) -> Any:
    async def metrics() -> Response:
        return Response(gw.metrics.render(), media_type=CONTENT_TYPE)

    return metrics


def metrics_app(gw: Gateway) -> FastAPI:
    """The gateway's Prometheus endpoint on its own loopback listener."""
    app = FastAPI(title="ssw gateway metrics", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.add_api_route("/metrics", metrics_endpoint(gw), methods=["GET"])
    return app


def pool_metrics_app(pool: GatewayPool) -> FastAPI:
    """The series of several gateway processes, added up, served by their parent."""
    registry = pool_registry(pool.metrics_dir)
    app = FastAPI(title="ssw gateway metrics", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)

    async def metrics() -> Response:
        host = pool.cfg.fleet.host_name() if pool.cfg.fleet.enabled else None
        return Response(label_host(generate_latest(registry), host), media_type=CONTENT_TYPE)

    app.add_api_route("/metrics", metrics, methods=["GET"])
    return app
