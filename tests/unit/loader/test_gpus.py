"""The NVML source against a faked pynvml module (CI has no GPU), and the
simulated source."""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ssw.config import GpuSettings, SimulatedGpu
from ssw.errors import ConfigError
from ssw.loader.gpus import NvmlGpus, SimulatedGpus, make_gpu_source, unit_of_pid

GB = 10**9


class FakeNvml(types.ModuleType):
    """The parts of nvidia-ml-py that ssw calls, over a table of devices."""

    class NVMLError(Exception):
        pass

    def __init__(self, devices: list[dict[str, Any]], init_error: bool = False) -> None:
        super().__init__("pynvml")
        self.devices = devices
        self.init_error = init_error

    def nvmlInit(self) -> None:
        if self.init_error:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> dict[str, Any]:
        return self.devices[i]

    def nvmlDeviceGetMemoryInfo(self, h: dict[str, Any]) -> Any:
        return types.SimpleNamespace(total=h["total"], used=h["used"], free=h["total"] - h["used"])

    def nvmlDeviceGetUtilizationRates(self, h: dict[str, Any]) -> Any:
        if h.get("util") is None:
            raise self.NVMLError("Not Supported")
        return types.SimpleNamespace(gpu=h["util"], memory=0)

    def nvmlDeviceGetComputeRunningProcesses(self, h: dict[str, Any]) -> list[Any]:
        return [types.SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in h["procs"]]

    NVML_TEMPERATURE_GPU = 0

    def nvmlDeviceGetTemperature(self, h: dict[str, Any], sensor: int) -> int:
        return 61

    def nvmlDeviceGetPowerUsage(self, h: dict[str, Any]) -> int:
        if h.get("power_mw") is None:
            raise self.NVMLError("Not Supported")
        return int(h["power_mw"])

    def nvmlDeviceGetName(self, h: dict[str, Any]) -> bytes:
        return b"NVIDIA A40"

    def nvmlDeviceGetUUID(self, h: dict[str, Any]) -> str:
        return h["uuid"]

    def nvmlDeviceGetMinorNumber(self, h: dict[str, Any]) -> int:
        if h.get("minor") is None:
            raise self.NVMLError("Not Supported")
        return int(h["minor"])


@pytest.fixture
def fake_nvml() -> Iterator[FakeNvml]:
    fake = FakeNvml(
        [
            {
                "uuid": "GPU-0",
                "total": 48 * GB,
                "used": 20 * GB,
                "util": 37,
                "procs": [(os.getpid(), 19 * GB)],
                "power_mw": 212_500,
                "minor": 3,  # the device node's number need not be the index
            },
            {"uuid": "GPU-1", "total": 48 * GB, "used": 1 * GB, "util": None, "procs": [(999_999_999, None)]},
        ]
    )
    saved = sys.modules.get("pynvml")
    sys.modules["pynvml"] = fake
    yield fake
    if saved is None:
        del sys.modules["pynvml"]
    else:
        sys.modules["pynvml"] = saved


async def test_nvml_source_reads_devices_and_attributes_processes(fake_nvml: FakeNvml) -> None:
    source = make_gpu_source(GpuSettings(source="nvml"))
    assert isinstance(source, NvmlGpus) and source.kind == "nvml"
    g0, g1 = await source.snapshot({})
    assert (g0.index, g0.uuid, g0.name, g0.memory_total, g0.memory_used) == (0, "GPU-0", "NVIDIA A40", 48 * GB, 20 * GB)
    assert g0.memory_free == 28 * GB and g0.utilization_pct == 37
    assert g0.temperature_c == 61 and g0.power_w == 212.5
    assert g1.utilization_pct is None and g1.power_w is None  # unknown stays unknown, not 0
    assert g0.device_node == "/dev/nvidia3" and g1.device_node is None
    (proc,) = g0.processes
    assert proc.pid == os.getpid() and proc.used_bytes == 19 * GB
    assert proc.unit == unit_of_pid(os.getpid())
    (gone,) = g1.processes
    assert gone.used_bytes is None and gone.unit is None


def test_missing_nvml_is_a_clear_start_up_error(fake_nvml: FakeNvml) -> None:
    fake_nvml.init_error = True
    with pytest.raises(ConfigError, match=r"NVML cannot start .*Driver Not Loaded.*gpus\.source: simulated"):
        make_gpu_source(GpuSettings(source="nvml"))


def test_unit_of_pid_reads_the_cgroup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = tmp_path / "proc" / "42"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text("0::/ssw.slice/ssw-workers.slice/ssw-worker@qwen3\\x2d8b:2.service\n")
    real_path = Path

    def fake_path(p: str) -> Path:
        return real_path(str(tmp_path) + p) if p.startswith("/proc/42") else real_path(p)

    monkeypatch.setattr("ssw.loader.gpus.Path", fake_path)
    assert unit_of_pid(42) == "ssw-worker@qwen3\\x2d8b:2.service"
    assert unit_of_pid(43) is None


async def test_simulated_source_reports_what_workers_hold() -> None:
    source = SimulatedGpus(GpuSettings(source="simulated", simulated=[SimulatedGpu(memory_gb=48)] * 2))
    g0, g1 = await source.snapshot({1: 7 * GB})
    assert (g0.memory_used, g1.memory_used, g1.memory_free) == (0, 7 * GB, 41 * GB)
    assert g0.uuid == "SIM-00000000" and g0.utilization_pct is None
