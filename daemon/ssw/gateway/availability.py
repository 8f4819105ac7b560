"""Whether a model can serve now, and what a request does while it cannot: its
ready workers (this host's, or another host's gateway in a fleet), else a load
asked of the loader (or placed on another host, decided fleet-wide) and the
request held until the model is ready, fails or the wait times out; or a 202 or
503 with an honest ``Retry-After``. Waiters are released or failed the moment
the loader's news (or the fleet's) says so."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from ssw.common import tasks
from ssw.common.contract import LoadProgress, ModelView, Snapshot, WorkerView
from ssw.common.states import Failure, LoadState, WorkerState
from ssw.common.tasks import TaskSet
from ssw.config import Config
from ssw.errors import (
    ClientLeft,
    DeadlineUnmet,
    LoaderUnavailable,
    LoadFailed,
    ModelLoading,
    ModelNotFound,
    NoCapacity,
    SswError,
    UpstreamError,
)
from ssw.gateway.fleet import FleetUnavailable, FleetView
from ssw.gateway.loader_client import LoaderClient
from ssw.gateway.metrics import GatewayMetrics
from ssw.gateway.names import Names
from ssw.gateway.relay import Reply
from ssw.gateway.waitqueue import WaitQueue

log = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER_S = 60  # when a model has never loaded here
LOADER_RETRY_S = 0.5  # how often a load is asked for again while the loader cannot be reached
DEFAULT_WAKE_S = 5  # a sleeping model that never woke here: vLLM wakes in about a second
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


@dataclass(frozen=True, slots=True)
class Deadline:
    """How long a request may wait for its first token while its model is not ready."""

    ms: int
    at: float  # the event loop's clock

    @classmethod
    def after(cls, ms: int) -> Deadline:
        return cls(ms, asyncio.get_running_loop().time() + ms / 1000)

    def left(self) -> float:
        return self.at - asyncio.get_running_loop().time()


class Availability:
    def __init__(
        self,
        cfg: Config,
        loader: LoaderClient,
        queue: WaitQueue,
        metrics: GatewayMetrics,
        names: Callable[[], Names],
        fleet: FleetView | None,
    ) -> None:
        self.cfg = cfg
        self.loader = loader
        self.queue = queue
        self.metrics = metrics
        self._names = names
        self.fleet = fleet
        # model -> (epoch, seq) of the snapshot that reflects its load request
        self._asked: dict[str, tuple[str, int]] = {}
        self._asking: set[str] = set()  # models whose load is being asked for again
        self._tasks = TaskSet()
        # model -> the host its waiters wait on (a load placed on another host)
        self._placed: dict[str, Placed] = {}
        loader.on_snapshot(self.on_snapshot)

    @property
    def names(self) -> Names:
        return self._names()

    def retry_after(self, model: str) -> int:
        """An honest wait, in whole seconds (at least 1): :meth:`eta_s`."""
        return max(1, math.ceil(self.eta_s(model)))

    def eta_s(self, model: str) -> float:
        """When the model should be ready: its measured load (or wake) time less what has
        passed, plus what is left of a backoff."""
        entry = self.names.models.get(model)
        if entry is None:
            return DEFAULT_RETRY_AFTER_S
        live = self.names.live.get(model, [])
        if model in self.names.asleep or any(w.state is WorkerState.WAKING for w in live):
            return entry.wake_seconds or DEFAULT_WAKE_S
        load_s = entry.load_seconds or DEFAULT_RETRY_AFTER_S
        rec = entry.load
        now = time.time()
        if rec.state is LoadState.BACKING_OFF and rec.deadline:
            return max(rec.deadline - now + load_s, 0.0)
        if rec.state is LoadState.COOLING_DOWN and rec.deadline:
            return max(rec.deadline - now, 0.0)
        if rec.state is LoadState.LOADING and entry.load_seconds:
            return max(load_s - (now - rec.since), 0.0)
        return load_s

    def on_snapshot(self, snap: Snapshot, restarted: bool) -> None:
        """Release or fail waiters as soon as the loader's news arrives; after a loader
        restart, ask again for the loads they wait for."""
        self.check_waiters(restarted)

    def on_fleet(self) -> None:
        """News of the fleet: hosts joined or left, its Redis answers or not."""
        assert self.fleet is not None
        self.metrics.fleet_connected.set(1 if self.fleet.connected else 0)
        self.metrics.fleet_hosts.set(len(self.fleet.hosts))
        if self.loader.snapshot is not None:
            self.check_waiters()

    def check_waiters(self, restarted: bool = False) -> None:
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
            self._tasks.spawn(self._ask_again(model))

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
        self,
        model: str,
        mode: str,
        priority: str,
        reply: Reply,
        stream: bool,
        hop: bool = False,
        key: str = "",
        deadline: Deadline | None = None,
        trace: bytes | None = None,
    ) -> list[WorkerView]:
        """The model's ready workers: this host's, else (in a fleet) other hosts' gateways
        that have it ready. While it is ready nowhere, start its load where the fleet
        decides (here without a fleet) and hold the request (mode 'wait'), or raise
        ModelLoading for a 202 or 503 answer. A request another host sent here (``hop``)
        is served by this host's workers only. With a ``deadline`` the model cannot meet (its
        ETA is later, or a held request's deadline passes), DeadlineUnmet: its load goes on.
        ``trace``: the request's traceparent, which a load it starts continues."""
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
                    return await self._hold_remote(model, target, mode, priority, reply, stream, key, deadline)
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
                accepted = await self.loader.request_load(model, priority=priority, traceparent=trace)
            except LoaderUnavailable:
                if mode != "wait":
                    raise
                reask = True  # held, and asked again once the loader is back (a restart takes seconds)
            else:
                self._asked[model] = (accepted.epoch, accepted.seq)
        else:
            self._asked.setdefault(model, (names.snap.epoch, names.snap.seq))
        retry = self.retry_after(model)
        self._check_deadline(model, self.eta_s(model), deadline)
        if mode != "wait":
            raise ModelLoading(f"model '{model}' is loading", retry)
        then = self._ask_again_soon if reask else None
        await self._hold(model, priority, retry, reply, stream, then, here_only=hop, deadline=deadline)
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
        deadline: Deadline | None = None,
    ) -> None:
        """Wait until the model's waiters are released (or failed, or time out: at
        gateway.wait_timeout_s, or at the request's deadline when that comes first)."""
        waiter = self.queue.add(model, priority, retry, here_only)
        if then is not None:
            then(model)
        self.check_waiters()  # it may have become ready (or failed) meanwhile
        keepalive = self._spawn_keepalive(reply, model) if stream else None
        # A client that leaves while held is dropped: its place in the queue too.
        left = asyncio.ensure_future(reply.client_left())
        limit = self.cfg.gateway.wait_timeout_s
        by_deadline = deadline is not None and deadline.left() < limit
        try:
            async with asyncio.timeout(deadline.left() if deadline is not None and by_deadline else limit):
                await asyncio.wait([waiter.future, left], return_when=asyncio.FIRST_COMPLETED)
            if not waiter.future.done():
                self.queue.discard(waiter)
                raise ClientLeft(f"the client left while '{model}' loaded")
            waiter.future.result()
        except TimeoutError:
            self.queue.discard(waiter)
            if deadline is not None and by_deadline:
                raise DeadlineUnmet(model, self.eta_s(model), deadline.ms) from None
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
                and (
                    entry.load.state is not LoadState.IDLE
                    or any(w.model == model and w.rank == 0 for w in record.workers)
                )
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
        self,
        model: str,
        host: str,
        mode: str,
        priority: str,
        reply: Reply,
        stream: bool,
        key: str,
        deadline: Deadline | None = None,
    ) -> list[WorkerView]:
        assert self.fleet is not None
        placed = self._placed.get(model)
        if placed is None or placed.host != host:
            since = await self.fleet.ask_load(host, model, key, priority)
            self._placed[model] = Placed(host, key, priority, since)
        retry = self._remote_retry_after(model, host)
        self._check_deadline(model, retry, deadline)
        if mode != "wait":
            raise ModelLoading(f"model '{model}' is loading on host {host}", retry)
        await self._hold(model, priority, retry, reply, stream, deadline=deadline)
        names = self.names
        workers = names.ready.get(model) or names.remote.get(model)
        if not workers:
            raise UpstreamError(f"model '{model}' was ready but its worker is gone again; retry")
        return workers

    @staticmethod
    def _check_deadline(model: str, eta_s: float, deadline: Deadline | None) -> None:
        """A model that will not be ready within the request's deadline: DeadlineUnmet now
        (its load was asked for already), rather than a wait that cannot end in time."""
        if deadline is not None and eta_s > deadline.left():
            raise DeadlineUnmet(model, eta_s, deadline.ms)

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
            self._tasks.spawn(self._place_again(model, placed))
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
            and not any(w.model == model and w.rank == 0 and w.state is not WorkerState.FAILED for w in record.workers)
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
                accepted = await self.loader.request_load(model, priority=placed.priority)
                self._asked[model] = (accepted.epoch, accepted.seq)
            else:
                since = await self.fleet.ask_load(host, model, placed.key, placed.priority)  # type: ignore[union-attr]
                self._placed[model] = Placed(host, placed.key, placed.priority, since)
        except SswError as exc:
            self.queue.fail(model, exc)

    def _spawn_keepalive(self, reply: Reply, model: str) -> asyncio.Task[None]:
        async def beat() -> None:
            interval = self.cfg.gateway.keepalive_s
            await asyncio.sleep(interval)
            # Held this long: start the event stream, so that proxies and clients see life.
            if not reply.started:
                await reply.start_sse()
            while True:
                await reply.body(keepalive_comment(model, self.names.progress(model), time.time()))
                await asyncio.sleep(interval)

        return asyncio.ensure_future(beat())


def keepalive_comment(model: str, progress: LoadProgress | None, now: float) -> bytes:
    """A held stream's keep-alive: an SSE comment (clients ignore it) that says where the
    load stands, e.g. ``: ssw: waiting for tiny: load, engine_ready, 12.3 s of ~20.0 s (ETA 7.7 s)``."""
    text = f"waiting for {model}"
    if progress is not None:
        p = progress.describe(now)
        text += f": {p['kind']}, {p['phase']}, {p['elapsed_s']} s"
        if p["expected_s"] is not None:
            text += f" of ~{p['expected_s']} s (ETA {p['eta_s']} s)"
    return b": ssw: " + text.encode() + b"\n\n"
