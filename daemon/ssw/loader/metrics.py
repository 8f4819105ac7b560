"""The loader's Prometheus series, read at scrape time through plain callables
(this module knows nothing of the worker table)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ssw.common.prom import label_host
from ssw.loader.gpus import GpuInfo
from ssw.loader.workers.lifecycle import Change

LOAD_BUCKETS = (1, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
RESIDENCY_BUCKETS = (10, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600, 7 * 24 * 3600)


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
        r = self.registry
        self.load_phase = Histogram(
            "ssw_load_phase_duration_seconds",
            "Each phase of a cold load (placement, eviction, unit_start, process_up, engine_ready).",
            ["model", "phase"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.wake = Histogram(
            "ssw_wake_duration_seconds",
            "From a sleeper asked to wake to ready again (room made, woken, canary passed), by sleep level.",
            ["model", "level"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.sleep = Histogram(
            "ssw_sleep_duration_seconds",
            "From a worker's drain to asleep (its requests finished, its GPU memory seen free), by sleep level.",
            ["model", "level"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.residency = Histogram(
            "ssw_worker_residency_seconds",
            "How long a worker served (ready) before it left service: drained, stopped or failed.",
            ["model"],
            buckets=RESIDENCY_BUCKETS,
            registry=r,
        )
        self.retirements = Counter(
            "ssw_worker_retirements",
            "Workers taken out of service by ssw, by cause: evicted (room for another model), idle, keep_alive, "
            "unload, ram_budget (too many sleepers), no_room (could not wake), resumed, replaced (hung), other.",
            ["model", "cause"],
            registry=r,
        )
        self.failures = Counter(
            "ssw_worker_failures",
            "Workers that ended on their own or could not start or wake, by the state they were in.",
            ["model", "state"],
            registry=r,
        )
        self.load_setbacks = Counter(
            "ssw_load_setbacks",
            "Loads that failed and now back off (a retry waits) or cool down (refused until the deadline).",
            ["model", "state"],
            registry=r,
        )
        self.check_failures = Counter(
            "ssw_health_check_failures",
            "Failed checks of serving workers: health (/health) or canary (a 1-token generation).",
            ["model", "check"],
            registry=r,
        )
        self.registry.register(_LoaderCollector(worker_counts, evictions, gpus, reserved))
        ProcessCollector(registry=self.registry)

    def render(self) -> bytes:
        return label_host(generate_latest(self.registry), self.host)

    def observe(self, change: Change) -> None:
        """A lifecycle change, counted (a listener of :class:`Lifecycle`)."""
        model = change.model
        if change.unit is None:
            if change.state in ("backing_off", "cooling_down"):
                self.load_setbacks.labels(model, change.state).inc()
            return
        if change.phases:
            for phase, seconds in change.phases.items():
                if phase != "total":
                    self.load_phase.labels(model, phase).observe(seconds)
        if change.previous == "waking" and change.state == "ready":
            self.wake.labels(model, str(change.sleep_level or 0)).observe(change.held_s)
        if change.previous == "draining" and change.state == "sleeping":
            self.sleep.labels(model, str(change.sleep_level or 0)).observe(change.held_s)
        if change.served_s is not None:
            self.residency.labels(model).observe(change.served_s)
        if change.retired:
            self.retirements.labels(model, change.cause).inc()
        if change.state == "failed" and change.previous != "stopping":
            self.failures.labels(model, change.previous).inc()

    def check_failed(self, model: str, check: str) -> None:
        self.check_failures.labels(model, check).inc()


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
