"""The loader's Prometheus series, read at scrape time through plain callables
(this module knows nothing of the worker table)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ssw.common.prom import label_host
from ssw.loader.gpus import GpuInfo

LOAD_BUCKETS = (1, 5, 10, 20, 30, 60, 120, 300, 600, 1200)


class LoaderMetrics:
    """The loader's series, read at scrape time through plain callables (this module
    knows nothing of the worker table)."""

    def __init__(
        self,
        worker_counts: Callable[[], dict[str, int]],
        evictions: Callable[[], int],
        gpus: Callable[[], list[GpuInfo]],
        reserved: Callable[[], dict[int, int]],
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.host: str | None = None  # in a fleet, every series is labelled with the host
        self.loads = Counter("ssw_loads", "Model loads by result.", ["model", "result"], registry=self.registry)
        self.load_duration = Histogram(
            "ssw_load_duration_seconds",
            "Time from a worker's start to healthy.",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=self.registry,
        )
        self.known_answer_failures = Counter(
            "ssw_known_answer_failures",
            "Workers whose answer to the fixed prompt differed from the recorded one, after a wake or a start.",
            ["model", "after"],
            registry=self.registry,
        )
        self.registry.register(_LoaderCollector(worker_counts, evictions, gpus, reserved))
        ProcessCollector(registry=self.registry)

    def render(self) -> bytes:
        return label_host(generate_latest(self.registry), self.host)


class _LoaderCollector(Collector):
    def __init__(
        self,
        worker_counts: Callable[[], dict[str, int]],
        evictions: Callable[[], int],
        gpus: Callable[[], list[GpuInfo]],
        reserved: Callable[[], dict[int, int]],
    ) -> None:
        self._worker_counts = worker_counts
        self._evictions = evictions
        self._gpus = gpus
        self._reserved = reserved

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        workers = GaugeMetricFamily("ssw_workers", "Workers by state.", labels=["state"])
        for state, n in self._worker_counts().items():
            workers.add_metric([state], n)
        yield workers
        yield CounterMetricFamily("ssw_evictions", "Workers evicted to make room.", value=self._evictions())
        reserved = self._reserved()
        families = {
            "total": GaugeMetricFamily("ssw_gpu_memory_total_bytes", "GPU memory.", labels=["gpu"]),
            "used": GaugeMetricFamily("ssw_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"]),
            "reserved": GaugeMetricFamily(
                "ssw_gpu_memory_reserved_bytes", "GPU memory reserved by loads in flight.", labels=["gpu"]
            ),
            "util": GaugeMetricFamily("ssw_gpu_utilization_ratio", "GPU utilization (0-1).", labels=["gpu"]),
            "temp": GaugeMetricFamily("ssw_gpu_temperature_celsius", "GPU temperature.", labels=["gpu"]),
            "power": GaugeMetricFamily("ssw_gpu_power_watts", "GPU power draw.", labels=["gpu"]),
        }
        for g in self._gpus():
            label = [str(g.index)]
            families["total"].add_metric(label, g.memory_total)
            families["used"].add_metric(label, g.memory_used)
            families["reserved"].add_metric(label, reserved.get(g.index, 0))
            # Unknown values are left out rather than reported as zero.
            if g.utilization_pct is not None:
                families["util"].add_metric(label, g.utilization_pct / 100)
            if g.temperature_c is not None:
                families["temp"].add_metric(label, g.temperature_c)
            if g.power_w is not None:
                families["power"].add_metric(label, g.power_w)
        yield from families.values()
