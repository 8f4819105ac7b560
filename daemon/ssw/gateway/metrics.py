"""Prometheus metrics: one registry per role, so ``ssw serve`` (both roles in one
process) exposes each set once. Names follow Prometheus conventions: the
``ssw_`` prefix, base units (seconds, bytes), ``_total`` for counters."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ssw.loader.gpus import GpuInfo

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LOAD_BUCKETS = (1, 5, 10, 20, 30, 60, 120, 300, 600, 1200)


class GatewayMetrics:
    """The gateway's series. With several gateway processes (prometheus_client's
    multiprocess mode) they add up across processes; the parent serves them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "ssw_requests", "Requests answered by the gateway, by route.", ["model", "status", "route"], registry=r
        )
        self.duration = Histogram(
            "ssw_request_duration_seconds",
            "End-to-end request latency.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "ssw_time_to_first_token_seconds",
            "Time to the first streamed token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("ssw_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.completion_tokens = Counter("ssw_completion_tokens", "Completion tokens generated.", ["model"], registry=r)
        self.dropped = Counter(
            "ssw_metrics_records_dropped", "Request records not written to Redis (down, slow or full).", registry=r
        )
        self.waiting = Gauge(
            "ssw_waiting_requests",
            "Requests waiting for their model to load.",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        # In a fleet: whether its Redis answers, and how many hosts are in it.
        self.fleet_connected = Gauge(
            "ssw_fleet_connected", "1 while the fleet's Redis answers.", registry=r, multiprocess_mode="max"
        )
        self.fleet_hosts = Gauge(
            "ssw_fleet_hosts", "Hosts of the fleet heard from within the TTL.", registry=r, multiprocess_mode="max"
        )
        self.host: str | None = None  # in a fleet, every series is labelled with the host
        # The asynchronous tier (one process runs it: livesum adds the others' zeros).
        self.batch_lines = Counter(
            "ssw_batch_lines", "Batch lines and async jobs finished, by outcome.", ["model", "outcome"], registry=r
        )
        self.batch_queued = Gauge(
            "ssw_batch_lines_queued",
            "Batch lines and async jobs waiting to run.",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.batch_running = Gauge(
            "ssw_batch_lines_running",
            "Batch lines and async jobs running.",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.batch_yields = Counter(
            "ssw_batch_yields",
            "Times batch work stopped starting lines because interactive requests queued.",
            ["model"],
            registry=r,
        )
        # process_resident_memory_bytes, process_open_fds, CPU seconds: what the
        # gateway costs, per connection and per waiting request.
        ProcessCollector(registry=r)
        # Requests are counted in batches; a scrape folds in the latest first.
        self.before_scrape: Callable[[], None] | None = None

    def render(self) -> bytes:
        if self.before_scrape is not None:
            self.before_scrape()
        return label_host(generate_latest(self.registry), self.host)


def label_host(text: bytes, host: str | None) -> bytes:
    """Every sample labelled host="<host>" (in a fleet: one Prometheus scrapes many hosts
    through the same names). Without a host, the text as it was."""
    if not host:
        return text
    label = b'host="' + host.encode() + b'"'
    out = []
    for line in text.split(b"\n"):
        if line and not line.startswith(b"#"):
            name_end = min((i for i in (line.find(b"{"), line.find(b" ")) if i >= 0), default=-1)
            if name_end >= 0:
                if line[name_end : name_end + 1] == b"{":
                    closing = line.rfind(b"}")
                    inner = line[name_end + 1 : closing]
                    line = line[: name_end + 1] + label + (b"," + inner if inner else b"") + line[closing:]
                else:
                    line = line[:name_end] + b"{" + label + b"}" + line[name_end:]
        out.append(line)
    return b"\n".join(out)


def pool_registry(metrics_dir: str) -> CollectorRegistry:
    """What the parent of several gateway processes serves: their series added up,
    and its own process's."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry(auto_describe=True)
    multiprocess.MultiProcessCollector(registry, path=metrics_dir)
    ProcessCollector(registry=registry)
    return registry


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
