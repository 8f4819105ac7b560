"""The warm tier's decisions (pure, tested by tables): how a worker that must give
back its GPU memory goes (sleep level 1, sleep level 2, or stopped), which
sleepers are stopped when the host memory they hold runs past the budget, and
when a sleep counts as having freed the GPU.

Sleep level 1 moves the weights to host RAM and drops the KV cache: the wake
copies them back (vLLM: 0.3-0.8 s for small models). Level 2 drops the weights
too and keeps the engine (compiled graphs, allocator): the wake reloads them
from disk, still far quicker than a cold start, and needs almost no host RAM.
Stopping frees everything; the next request pays a cold start.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Tier = Literal["sleep1", "sleep2", "stop"]


@dataclass(frozen=True)
class Victim:
    """What is known about a worker that must give back its GPU memory."""

    sleep_enabled: bool  # the model's workers started with sleep mode
    weights_bytes: int  # what level 1 moves into host RAM
    ram_bytes: int  # host memory its process holds now (cgroup MemoryCurrent; 0: unknown)
    cold_start_s: float | None  # measured median cold start; None: never measured
    wake_s: dict[int, float]  # measured median wake time per sleep level


@dataclass(frozen=True)
class Choice:
    tier: Tier
    reason: str

    @property
    def level(self) -> int:
        return {"sleep1": 1, "sleep2": 2}.get(self.tier, 0)


def _pays(level: int, victim: Victim) -> bool:
    """Whether waking at this level is measured (or, unmeasured, assumed) to beat a cold start."""
    wake = victim.wake_s.get(level)
    if wake is None or victim.cold_start_s is None:
        return True  # vLLM's figures: a wake is one to two orders of magnitude quicker
    return wake < victim.cold_start_s


def choose(victim: Victim, ram_budget: int) -> Choice:
    """Sleep level 1 when the host memory budget for sleepers can hold the weights,
    else level 2, else stop; a level whose measured wake is no quicker than the
    measured cold start is skipped. ``ram_budget`` is the whole budget: sleepers
    that no longer fit beside this one are stopped afterwards (:func:`over_budget`)."""
    if not victim.sleep_enabled:
        return Choice("stop", "sleep mode is off for this model")
    level1 = victim.ram_bytes + victim.weights_bytes
    if level1 <= ram_budget and _pays(1, victim):
        return Choice("sleep1", f"its weights ({victim.weights_bytes / 1e9:.1f} GB) fit in the sleepers' host memory")
    why = (
        f"level 1 needs {level1 / 1e9:.1f} GB of host memory, the budget is {ram_budget / 1e9:.1f} GB"
        if level1 > ram_budget
        else "level 1 wakes no quicker than a cold start (measured)"
    )
    if victim.ram_bytes <= ram_budget and _pays(2, victim):
        return Choice("sleep2", why)
    return Choice("stop", f"{why}, and level 2 does not pay either")


@dataclass(frozen=True)
class Sleeper:
    unit: str
    ram_bytes: int  # cgroup MemoryCurrent
    slept_at: float  # when it last served, or fell asleep
    pinned: bool = False  # counts against the budget, but is never stopped for it


def over_budget(sleepers: Sequence[Sleeper], ram_budget: int) -> list[str]:
    """The least recently used unpinned sleepers to stop until the rest fit in the budget
    (pinned models are never evicted, asleep or not)."""
    total = sum(s.ram_bytes for s in sleepers)
    stop: list[str] = []
    for s in sorted((s for s in sleepers if not s.pinned), key=lambda s: s.slept_at):
        if total <= ram_budget:
            break
        stop.append(s.unit)
        total -= s.ram_bytes
    return stop


def freed(held_before: int, held_now: int, residual_bytes: int) -> bool:
    """Whether a sleep gave back its GPU memory: what the worker still holds is at
    most the residual a sleeping engine keeps (its CUDA context), or a tenth of
    what it held."""
    return held_now <= max(residual_bytes, held_before // 10)


def ram_budget(configured_gb: float | None, fraction: float, host_total_bytes: int) -> int:
    """placement.sleep_ram_gb, or placement.sleep_ram_fraction of the host's memory."""
    if configured_gb is not None:
        return int(configured_gb * 1e9)
    return int(host_total_bytes * fraction)


def prewarm_order(served: dict[str, int], candidates: set[str]) -> list[str]:
    """The candidates (models not yet up) that were served, most requested first;
    the name breaks ties, so the order is the same on every boot."""
    return sorted((m for m in served if m in candidates and served[m] > 0), key=lambda m: (-served[m], m))
