"""What a load does, decided before anything is done (pure): where a new replica
starts, which workers give way, its budget and its unit's name
(:func:`plan_start`); whether a sleeping replica can wake where it sleeps, and
who gives way for it (:func:`plan_wake`). The caller reads the inventory under
the place lock, asks here, and carries the plan out under the same lock."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from ssw.errors import NoCapacity, SswError
from ssw.loader.decide.placement import INTERACTIVE, DeviceView, Placement, Policy, Resident, place
from ssw.loader.decide.vram import GB, VramNeed
from ssw.loader.systemd.units import instance_for, unit_name


@dataclass(frozen=True)
class StartPlan:
    unit: str  # the new worker's unit name (never one systemd still has loaded)
    gpus: tuple[int, ...]
    evict: tuple[str, ...]  # units that give way first
    per_gpu_bytes: int  # the worker's budget on each of its GPUs
    drain: tuple[str, ...] = ()  # of those, the ones that may serve their queue first


def plan_start(
    model: str,
    replica: int,
    replicas: int,
    need: VramNeed,
    devices: Sequence[DeviceView],
    residents: Sequence[Resident],
    policy: Policy,
    allowed: Sequence[int] | None,
    tensor_parallel: bool,
    taken: Collection[str],
    rank: int = INTERACTIVE,
    width: int = 1,
) -> StartPlan:
    """Where replica ``replica`` of ``model`` starts; NoCapacity (naming the model and
    the numbers) when it fits nowhere, even after evictions."""
    try:
        placed = place(need, devices, residents, policy, allowed, tensor_parallel, rank, width)
    except SswError as exc:
        exc.message = f"{model}: {exc.message}"
        raise
    unit = unit_name(model, instance_for(model, replica, replicas, taken))
    return StartPlan(unit, placed.gpus, placed.evict, placed.per_gpu_bytes, placed.drain)


def plan_wake(
    need: int,
    gpus: tuple[int, ...],
    devices: Sequence[DeviceView],
    residents: Sequence[Resident],
    policy: Policy,
    rank: int = INTERACTIVE,
) -> Placement:
    """Who gives way for a sleeper to wake on its own GPUs, needing ``need`` more bytes on
    each. A tensor-parallel sleeper wakes only where every GPU but the first has room
    already (evicting is decided on the first); NoCapacity otherwise."""
    for g in gpus[1:]:
        view = next(d for d in devices if d.index == g)
        if view.free_after_release < need:
            raise NoCapacity(f"GPU {g} has {view.free_after_release / GB:.1f} GB free")
    return place(VramNeed(need, 0, None, "its size before it slept"), devices, residents, policy, gpus[:1], False, rank)
