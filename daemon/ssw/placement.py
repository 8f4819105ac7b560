"""Which GPU a new worker goes to (pure: decisions over a snapshot)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .errors import NoCapacity
from .gpus import GB


@dataclass(frozen=True)
class DeviceView:
    index: int
    total: int
    reserved: int  # budgets of ssw's workers on it, starting ones included
    used_by_others: int  # memory held by processes ssw does not own (NVML only)

    @property
    def free(self) -> int:
        return self.total - self.reserved - self.used_by_others


def choose_device(need: int, devices: Iterable[DeviceView]) -> int:
    """The device with the most free memory that fits ``need``; NoCapacity otherwise."""
    candidates = [d for d in devices if d.free >= need]
    if not candidates:
        raise NoCapacity(f"no GPU has {need / GB:.1f} GB free for this model; unload a model or lower its vram_gb")
    # Most free first; the lowest index breaks ties so placement is repeatable.
    return max(candidates, key=lambda d: (d.free, -d.index)).index
