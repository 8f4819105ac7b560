"""The gateway's Prometheus series (one registry per role, so ``ssw serve``, both
roles in one process, exposes each set once). Names follow Prometheus conventions: the
``ssw_`` prefix, base units (seconds, bytes), ``_total`` for counters."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from ssw.common.prom import label_host

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


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
            ["model", "priority"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "ssw_time_to_first_token_seconds",
            "Time to the first streamed token.",
            ["model", "priority"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.load_wait = Histogram(
            "ssw_load_wait_seconds",
            "Time a request was held waiting for its model to load or wake (requests that waited).",
            ["model", "priority"],
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
            ["model", "priority"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.loader_connected = Gauge(
            "ssw_loader_connected",
            "1 while the gateway follows the loader's snapshot stream (0: it serves the workers it last knew).",
            registry=r,
            multiprocess_mode="min",
        )
        # In a fleet: whether its Redis answers, and how many hosts are in it.
        self.fleet_connected = Gauge(
            "ssw_fleet_connected", "1 while the fleet's Redis answers.", registry=r, multiprocess_mode="max"
        )
        self.fleet_hosts = Gauge(
            "ssw_fleet_hosts", "Hosts of the fleet heard from within the TTL.", registry=r, multiprocess_mode="max"
        )
        self.host: str | None = None  # in a fleet, every series is labelled with the host
        # process_resident_memory_bytes, process_open_fds, CPU seconds: what the
        # gateway costs, per connection and per waiting request.
        ProcessCollector(registry=r)
        # Requests are counted in batches; a scrape folds in the latest first.
        self.before_scrape: Callable[[], None] | None = None

    def render(self) -> bytes:
        if self.before_scrape is not None:
            self.before_scrape()
        return label_host(generate_latest(self.registry), self.host)


def pool_registry(metrics_dir: str) -> CollectorRegistry:
    """What the parent of several gateway processes serves: their series added up,
    and its own process's."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry(auto_describe=True)
    multiprocess.MultiProcessCollector(registry, path=metrics_dir)
    ProcessCollector(registry=registry)
    return registry
