"""Names, aliases and workers as of one loader snapshot (and, in a fleet, the other
hosts' latest records), indexed for the hot path: what a request's ``model``
resolves to, and which workers serve it."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

from ssw.common.contract import LoadProgress, ModelView, Snapshot, SplitView, WorkerView, valid_alias
from ssw.common.states import ASLEEP, LIVE, LoadState, WorkerState
from ssw.errors import BadRequest, ModelNotFound

if TYPE_CHECKING:
    from ssw.gateway.fleet import FleetView


def remote_worker(host: str, model: str, url: str) -> WorkerView:
    """Another host's gateway, as a worker of ``model`` (its socket a URL)."""
    return WorkerView(unit=f"{host}/{model}", model=model, replica=1, state=WorkerState.READY, gpus=[], socket=url)


def remote_host(worker: WorkerView) -> str | None:
    """The host whose gateway ``worker`` is; None: a worker of this host."""
    if worker.socket.startswith(("http://", "https://")):
        return worker.unit.split("/", 1)[0]
    return None


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
        self.splits: dict[str, SplitView] = dict(snap.splits)
        # model -> other hosts' gateways that have it ready, as workers (their socket a URL)
        self.remote: dict[str, list[WorkerView]] = {}
        self.hosts: dict[str, dict[str, str]] = {}  # model -> host -> its state there
        if fleet is not None:
            for host, record in sorted(fleet.hosts.items()):
                for name, entry in record.models.items():
                    self.models.setdefault(name, entry)
                for alias, target in record.aliases.items():
                    self.aliases.setdefault(alias, target)
                # A headless rank of a model across hosts serves nothing where it runs:
                # its group's head does, and only the head is routed to.
                serving = [w for w in record.workers if w.rank == 0]
                ready = {w.model for w in serving if w.state is WorkerState.READY}
                ready |= {a for w in serving if w.state is WorkerState.READY for a in w.adapters}
                present = {w.model for w in serving}
                ranks = {w.model for w in record.workers if w.rank > 0}
                for name in record.models:
                    state = (
                        "ready"
                        if name in ready
                        else "loading"
                        if name in present
                        else "rank"
                        if name in ranks
                        else "unloaded"
                    )
                    self.hosts.setdefault(name, {})[host] = state
                    if state == "ready" and host != fleet.host and fleet.reachable(host):
                        self.remote.setdefault(name, []).append(remote_worker(host, name, record.url))
        self.ready: dict[str, list[WorkerView]] = {}
        self.live: dict[str, list[WorkerView]] = {}
        self.asleep: set[str] = set()
        for w in snap.workers:
            if w.rank > 0:
                continue  # a headless rank: its group's head (maybe on another host) serves
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

    def resolve(self, name: object, who: str | None = None, within: Collection[str] | None = None) -> str:
        """The model a name means: itself, an alias's model, or (an A/B split) the model
        ``who`` sticks to (anyone, when nobody is named), among those ``within`` (a key's
        scope) where any of the split's are."""
        if not isinstance(name, str):
            raise BadRequest("'model' must be a string naming a model or alias")
        models = self.models
        if valid_alias(name):
            if name in models:
                return name
            target = self.aliases.get(name)
            if target in models:
                return target
            split = self.splits.get(name)
            if split is not None:
                shares = {m: s for m, s in split.shares.items() if m in models}
                if within is not None:
                    shares = {m: s for m, s in shares.items() if m in within} or shares
                if shares:
                    failing = {m for m in shares if models[m].load.state is LoadState.COOLING_DOWN}
                    return pick(name, shares, who, failing)
        raise ModelNotFound(name, sorted(models) + sorted(self.aliases) + sorted(self.splits))

    def expand(self, name: str) -> set[str]:
        """Every model a name may mean: one, or a split's all."""
        split = self.splits.get(name)
        if split is not None:
            return {m for m in split.shares if m in self.models}
        return {self.resolve(name)}

    def who(self, name: object, key: str | None, user: object) -> str | None:
        """Who sticks to one model of a split: the API key, or (sticky: user) the request's
        ``user`` field, else its key. None: nobody to stick (no key, no user)."""
        split = self.splits.get(name) if isinstance(name, str) else None
        if split is None:
            return None
        if split.sticky == "user" and isinstance(user, str) and user:
            return "user:" + user[:256]
        return "key:" + key if key else None

    def progress(self, model: str) -> LoadProgress | None:
        """This host's load or wake of the model in progress, if any."""
        entry = self.snap.models.get(model)
        return entry.load.progress if entry is not None else None

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


def pick(split: str, shares: Mapping[str, float], who: str | None, failing: Collection[str] = ()) -> str:
    """The model of an A/B split that ``who`` is served by (pure): a point in [0, 1) that a
    hash of the split and ``who`` places, over the shares in name order, so the same caller
    always lands on the same model and callers spread by share. Models that fail (cooling
    down) give their share to the others, unless all fail. Nobody named: anyone, by share."""
    usable = {m: s for m, s in shares.items() if m not in failing} or dict(shares)
    total = sum(usable.values())
    if who is None:
        point = random.random()
    else:
        digest = hashlib.sha256(f"{split}\0{who}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for model in sorted(usable):
        edge += usable[model] / total
        if point < edge:
            return model
    return sorted(usable)[-1]
