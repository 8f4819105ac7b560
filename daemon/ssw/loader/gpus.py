"""GPU sources: NVML (the NVIDIA driver, through nvidia-ml-py) or simulated
devices from the config. Both return the same snapshot types; NVML calls block,
so they run in a thread."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ssw.config import GpuSettings
from ssw.errors import ConfigError

log = logging.getLogger(__name__)
GB = 10**9


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    used_bytes: int | None  # None: the driver does not say (e.g. without permission)
    unit: str | None = None  # the systemd unit whose cgroup holds the process


def unit_of_pid(pid: int) -> str | None:
    """The service unit a process belongs to, from /proc/<pid>/cgroup (blocking).

    vLLM's GPU memory is held by its EngineCore child, not the unit's main PID,
    so attribution goes by cgroup rather than by PID."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        # "hierarchy:controllers:path"; the path may itself contain ':'.
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        for part in reversed(fields[2].split("/")):
            if part.endswith(".service"):
                return part
    return None


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    name: str
    memory_total: int
    memory_used: int
    utilization_pct: int | None
    processes: tuple[ProcessMemory, ...] = ()
    temperature_c: int | None = None
    power_w: float | None = None
    # Its device node, /dev/nvidia<minor> (not always /dev/nvidia<index>); None when simulated.
    device_node: str | None = None

    @property
    def memory_free(self) -> int:
        return max(self.memory_total - self.memory_used, 0)


class GpuSource(Protocol):
    kind: str

    async def snapshot(self, held: dict[int, int]) -> list[GpuInfo]:
        """Current devices; ``held`` is what ssw's workers hold per device index (the
        simulated source reports it as used; NVML measures for itself)."""
        ...


class SimulatedGpus:
    """Devices that exist only in the config; used memory is what ssw's workers hold."""

    kind = "simulated"

    def __init__(self, settings: GpuSettings) -> None:
        self._devices = settings.simulated

    async def snapshot(self, held: dict[int, int]) -> list[GpuInfo]:
        return [
            GpuInfo(
                index=i,
                uuid=f"SIM-{i:08d}",
                name=dev.name,
                memory_total=int(dev.memory_gb * GB),
                memory_used=held.get(i, 0),
                utilization_pct=dev.utilization_pct,
            )
            for i, dev in enumerate(self._devices)
        ]


class NvmlGpus:
    kind = "nvml"

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise ConfigError("gpus.source is 'nvml' but nvidia-ml-py is not installed") from exc
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise ConfigError(
                f"gpus.source is 'nvml' but NVML cannot start ({exc}); is the NVIDIA driver loaded? "
                "Hosts without NVIDIA GPUs use gpus.source: simulated"
            ) from exc

    def _read(self) -> list[GpuInfo]:
        nv = self._nvml
        out = []
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            try:
                util: int | None = int(nv.nvmlDeviceGetUtilizationRates(h).gpu)
            except nv.NVMLError:
                util = None
            try:
                procs = tuple(
                    ProcessMemory(pid=p.pid, used_bytes=p.usedGpuMemory, unit=unit_of_pid(p.pid))
                    for p in nv.nvmlDeviceGetComputeRunningProcesses(h)
                )
            except nv.NVMLError:
                procs = ()
            try:
                temperature: int | None = int(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
            except nv.NVMLError:
                temperature = None
            try:
                power: float | None = nv.nvmlDeviceGetPowerUsage(h) / 1000  # milliwatts
            except nv.NVMLError:
                power = None
            name = nv.nvmlDeviceGetName(h)
            uuid = nv.nvmlDeviceGetUUID(h)
            try:
                node: str | None = f"/dev/nvidia{int(nv.nvmlDeviceGetMinorNumber(h))}"
            except nv.NVMLError:
                node = None
            out.append(
                GpuInfo(
                    index=i,
                    uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    memory_total=int(mem.total),
                    memory_used=int(mem.used),
                    utilization_pct=util,
                    processes=procs,
                    temperature_c=temperature,
                    power_w=power,
                    device_node=node,
                )
            )
        return out

    async def snapshot(self, held: dict[int, int]) -> list[GpuInfo]:
        return await asyncio.to_thread(self._read)


def make_gpu_source(settings: GpuSettings) -> GpuSource:
    if settings.source == "simulated":
        return SimulatedGpus(settings)
    return NvmlGpus()
