"""Where a new worker goes, and which workers give way (pure: decisions over a
snapshot of GPUs and resident workers, tested by tables)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ssw.errors import NoCapacity, SwapDeferred
from ssw.loader.decide.vram import GB, VramNeed

Policy = Literal["spread", "pack"]
MAX_TENSOR_PARALLEL = 8
RELOAD_COST_STEP_S = 10.0
# Up to this many candidates on one GPU, every subset is weighed (4,096 at most); beyond,
# least recently used first until there is room.
MAX_EXACT_EVICTION = 12
# Ranks of the requests that wait: 0 realtime, 1 interactive, 2 batch (PRIORITY_RANK).
REALTIME = 0
INTERACTIVE = 1
RANKS = 3


@dataclass(frozen=True)
class DeviceView:
    index: int
    total: int
    used: int  # in use now: ssw's workers and any other process
    pending: int  # reserved by loads in flight and not yet in use
    releasing: int = 0  # part of `used` held by workers that are draining or stopping

    @property
    def free(self) -> int:
        return self.total - self.used - self.pending

    @property
    def free_after_release(self) -> int:
        """Free once the workers on their way out are gone (a start waits for them)."""
        return self.free + self.releasing


@dataclass(frozen=True)
class Resident:
    """A worker that holds memory and might give way."""

    unit: str
    gpus: tuple[int, ...]
    held: int  # bytes it counts for on each of its GPUs
    last_used: float  # wall time of its last request
    evictable: bool  # ready and not pinned
    reload_cost: float  # seconds its model takes to load (measured, or a size-based guess)
    asleep: bool = False  # holds only what a sleeping engine keeps; stopping it loses its warm state
    keeps: int = 0  # bytes it may keep on its GPU once evicted (put to sleep: its CUDA context)
    # Ready for less than placement.min_residency_s: evicted only for an urgent load, and only
    # when nothing else makes room (two models taking turns on one GPU must not thrash).
    young: bool = False
    # Requests in flight on it (running or queued in the engine), as the gateways report,
    # and the rank of the most urgent of them (None: nobody waits for it).
    waiters: int = 0
    waiter_rank: int | None = None
    # Starting or waking (not evictable): once ready, it may make room; a load waits for it.
    starting: bool = False

    @property
    def frees(self) -> int:
        return max(self.held - self.keeps, 0)

    @property
    def disturbs(self) -> tuple[int, int]:
        """What evicting it costs the requests that wait for it: how urgent the most urgent
        of them is (0: nobody waits), then how many they are."""
        if not self.waiters or self.waiter_rank is None:
            return (0, 0)
        return (RANKS - self.waiter_rank, self.waiters)


def disturbance(victims: Sequence[Resident]) -> tuple[int, int]:
    """A set of victims' cost to their waiters: the most urgent waiter, then all waiters."""
    return (max((v.disturbs[0] for v in victims), default=0), sum(v.disturbs[1] for v in victims))


@dataclass(frozen=True)
class Placement:
    gpus: tuple[int, ...]
    evict: tuple[str, ...] = ()
    per_gpu_bytes: int = 0
    # Victims that requests as urgent as this load's wait for: with
    # placement.drain_queue_before_swap they serve those first (fewer swaps).
    drain: tuple[str, ...] = ()

    @property
    def tensor_parallel(self) -> int:
        return len(self.gpus)


def _pick(devices: Sequence[DeviceView], need: int, policy: Policy, after_release: bool = False) -> DeviceView:
    def free(d: DeviceView) -> int:
        return d.free_after_release if after_release else d.free

    if policy == "pack":
        # Best fit: the least room left over; the lowest index breaks ties.
        return min(devices, key=lambda d: (free(d) - need, d.index))
    return max(devices, key=lambda d: (free(d), -d.index))


def _cost_step(victims: Sequence[Resident]) -> int:
    # Reload costs compare in coarse steps, so noise in measured load times never
    # overrides least-recently-used order.
    return math.ceil(sum(v.reload_cost for v in victims) / RELOAD_COST_STEP_S)


def _eviction_on(device: DeviceView, need: int, residents: Sequence[Resident]) -> tuple[list[Resident], bool]:
    """The evictable workers on this device that make room, counting what each gives back
    (a worker put to sleep keeps its context): first those that the fewest and least
    urgent requests wait for, then the fewest workers, then the cheapest to bring back,
    then the longest unused; sleepers last (they hold little, and stopping one loses a
    warm model). Returned least recently used first."""
    free = device.free_after_release
    candidates = sorted(
        (r for r in residents if r.evictable and device.index in r.gpus),
        key=lambda r: (r.disturbs, r.asleep, r.last_used),
    )
    if free + sum(r.frees for r in candidates) < need:
        return candidates, False
    if len(candidates) > MAX_EXACT_EVICTION:
        chosen: list[Resident] = []
        for r in candidates:
            if free >= need:
                break
            chosen.append(r)
            free += r.frees
        return chosen, True
    if free >= need:
        return [], True
    enough = [
        c
        for k in range(1, len(candidates) + 1)
        for c in itertools.combinations(candidates, k)
        if free + sum(r.frees for r in c) >= need
    ]
    best = min(
        enough,
        key=lambda c: (disturbance(c), len(c), sum(r.asleep for r in c), _cost_step(c), max(r.last_used for r in c)),
    )
    return list(best), True


def place(
    need: VramNeed,
    devices: Sequence[DeviceView],
    residents: Sequence[Resident],
    policy: Policy = "spread",
    allowed: Sequence[int] | None = None,
    tensor_parallel: bool = False,
    rank: int = INTERACTIVE,
    width: int = 1,
) -> Placement:
    """A placement for one worker (on ``width`` GPUs, each holding ``need``: a rank of a
    model across hosts), for a request of priority ``rank``; NoCapacity (with
    the numbers) when none exists. Workers that became ready a short while ago
    (``young``) are left alone; a realtime load may evict them when nothing else makes
    room; for another, SwapDeferred (the load waits for their residency to end).
    SwapDeferred too when the only room is a worker that more urgent requests than
    this one wait for: the load waits for them rather than swapping under them."""
    if width > 1:
        placed = _place_wide(need, devices, residents, width)
    else:
        placed = _place_settled(need, devices, residents, policy, allowed, tensor_parallel, rank)
    victims = [r for r in residents if r.unit in placed.evict]
    busy = [v for v in victims if v.waiters and v.waiter_rank is not None]
    urgent = [v for v in busy if v.waiter_rank is not None and v.waiter_rank < rank]
    if urgent:
        raise SwapDeferred(
            "the room is held by "
            + ", ".join(f"{v.unit} ({v.waiters} request(s) in flight, some more urgent)" for v in urgent)
        )
    return dataclasses.replace(placed, drain=tuple(v.unit for v in busy if v.waiter_rank == rank))


def _place_wide(need: VramNeed, devices: Sequence[DeviceView], residents: Sequence[Resident], width: int) -> Placement:
    """``width`` GPUs holding ``need`` each: those needing the fewest and least disturbing
    evictions (none where it fits), then the most free memory. Workers that became
    ready a short while ago are not evicted for it."""
    per = need.per_gpu(1)
    settled = [dataclasses.replace(r, evictable=False) if r.young else r for r in residents]
    options = []
    for d in devices:
        victims, enough = _eviction_on(d, per, settled)
        if enough:
            options.append(((disturbance(victims), len(victims), -d.free_after_release, d.index), d.index, victims))
    if len(options) < width:
        raise NoCapacity(
            f"a rank needs {width} GPUs with {per / GB:.1f} GB each ({need.source}); only {len(options)} of "
            f"{len(devices)} can hold it, even after evictions"
        )
    chosen = sorted(options, key=lambda o: o[0])[:width]
    evict = tuple(dict.fromkeys(v.unit for _, _, victims in chosen for v in victims))
    return Placement(tuple(sorted(index for _, index, _ in chosen)), evict, per)


def _place_settled(
    need: VramNeed,
    devices: Sequence[DeviceView],
    residents: Sequence[Resident],
    policy: Policy,
    allowed: Sequence[int] | None,
    tensor_parallel: bool,
    rank: int,
) -> Placement:
    settled = [dataclasses.replace(r, evictable=False) if r.young and r.evictable else r for r in residents]
    try:
        return _place(need, devices, settled, policy, allowed, tensor_parallel)
    except NoCapacity as exc:
        young = [r for r in residents if r.young and r.evictable]
        starting = [r for r in residents if r.starting]
        if rank == REALTIME and young:
            with contextlib.suppress(NoCapacity):
                return _place(need, devices, residents, policy, allowed, tensor_parallel)
        if not young and not starting:
            raise
        # Would there be room once they have settled (ready, and past their residency)?
        # Otherwise nobody need wait for them.
        later = [dataclasses.replace(r, evictable=True) if r.starting else r for r in residents]
        try:
            _place(need, devices, later, policy, allowed, tensor_parallel)
        except NoCapacity:
            raise exc from None
        why = [f"{r.unit} is still starting" for r in starting]
        if young:
            why.append(
                f"{len(young)} worker(s) that would make room became ready less than "
                "placement.min_residency_s ago: they give way to a realtime request only"
            )
        # The load waits for them (placement.swap_wait_s at most).
        raise SwapDeferred(f"{exc.message}; {'; '.join(why)}") from None


def _place(
    need: VramNeed,
    devices: Sequence[DeviceView],
    residents: Sequence[Resident],
    policy: Policy,
    allowed: Sequence[int] | None,
    tensor_parallel: bool,
) -> Placement:
    candidates = [d for d in devices if allowed is None or d.index in allowed]
    if not candidates:
        raise NoCapacity(f"no GPU among {list(allowed or [])} exists on this host")
    single = need.per_gpu(1)

    fitting = [d for d in candidates if d.free >= single]
    if fitting:
        return Placement((_pick(fitting, single, policy).index,), (), single)
    # Room that workers on their way out (unloaded, evicted) will give back: the
    # start waits for them rather than evicting anyone else.
    fitting = [d for d in candidates if d.free_after_release >= single]
    if fitting:
        return Placement((_pick(fitting, single, policy, after_release=True).index,), (), single)

    # Evict on one GPU: the fewest and least urgent waiters disturbed, then the fewest
    # workers, then the cheapest to bring back, then the longest unused.
    options = []
    for d in candidates:
        victims, enough = _eviction_on(d, single, residents)
        if enough and victims:
            key = (disturbance(victims), len(victims), _cost_step(victims), max(v.last_used for v in victims), d.index)
            options.append((key, d.index, victims))
    if options:
        _, index, victims = min(options, key=lambda o: o[0])
        return Placement((index,), tuple(v.unit for v in victims), single)

    if tensor_parallel:
        n = 2
        while n <= min(len(candidates), MAX_TENSOR_PARALLEL):
            per = need.per_gpu(n)
            roomy = sorted(
                (d for d in candidates if d.free_after_release >= per), key=lambda d: (-d.free_after_release, d.index)
            )
            if len(roomy) >= n:
                return Placement(tuple(sorted(d.index for d in roomy[:n])), (), per)
            n *= 2

    def achievable(d: DeviceView) -> int:
        return d.free_after_release + sum(r.frees for r in residents if r.evictable and d.index in r.gpus)

    best = max(candidates, key=achievable)
    hint = "" if tensor_parallel else "; placement.tensor_parallel would split it across GPUs"
    raise NoCapacity(
        f"needs {single / GB:.1f} GB on one GPU ({need.source}), but at most {achievable(best) / GB:.1f} GB "
        f"can be freed (GPU {best.index}, {best.total / GB:.1f} GB, evicting every unpinned idle worker){hint}"
    )
