"""The asynchronous tier's Prometheus series, registered in the registry of the
gateway process that runs the tier (one process does: ``livesum`` adds the
other processes' zeros)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class BatchMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.lines = Counter(
            "ssw_batch_lines",
            "Batch lines and async jobs finished, by outcome.",
            ["model", "outcome"],
            registry=registry,
        )
        self.queued = Gauge(
            "ssw_batch_lines_queued",
            "Batch lines and async jobs waiting to run.",
            ["model"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.running = Gauge(
            "ssw_batch_lines_running",
            "Batch lines and async jobs running.",
            ["model"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.yields = Counter(
            "ssw_batch_yields",
            "Times batch work stopped starting lines because interactive requests queued.",
            ["model"],
            registry=registry,
        )
