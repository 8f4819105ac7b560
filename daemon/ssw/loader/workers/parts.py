"""What every piece of the loader's machinery uses, built once by the loader and
handed to each piece: the config, systemd, the GPUs, the registry (through its
catalog), the facts store, the worker table, the load book, the probes, the feed
of changes, the task set, the gateways' demand and the lifecycle's log. One record instead of a constructor repeated in
every piece."""

from __future__ import annotations

from dataclasses import dataclass

from ssw.common.probes import Probes
from ssw.common.tasks import TaskSet
from ssw.config import Config
from ssw.loader.gpus import GpuSource
from ssw.loader.models.catalog import Catalog
from ssw.loader.store import FactStore, Retiring
from ssw.loader.systemd.bus import Systemd
from ssw.loader.workers.demand import Demand
from ssw.loader.workers.feed import Feed
from ssw.loader.workers.lifecycle import Lifecycle
from ssw.loader.workers.loads import LoadBook
from ssw.loader.workers.table import WorkerTable


@dataclass(frozen=True)
class Parts:
    cfg: Config
    systemd: Systemd
    gpus: GpuSource
    catalog: Catalog
    store: FactStore
    retiring: Retiring
    table: WorkerTable
    loads: LoadBook
    probes: Probes
    feed: Feed
    tasks: TaskSet
    demand: Demand
    lifecycle: Lifecycle

    @classmethod
    def build(
        cls, cfg: Config, systemd: Systemd, gpus: GpuSource, catalog: Catalog, store: FactStore, retiring: Retiring
    ) -> Parts:
        feed = Feed()
        lifecycle = Lifecycle()
        return cls(
            cfg,
            systemd,
            gpus,
            catalog,
            store,
            retiring,
            WorkerTable(feed.changed, lifecycle),
            LoadBook(feed.changed, lifecycle),
            Probes(
                cfg.health.probe_timeout_s,
                cfg.health.canary_timeout_s,
                max(cfg.workers.sleep_timeout_s, cfg.workers.wake_timeout_s),
                cfg.health.probe_max_bytes,
            ),
            feed,
            TaskSet(),
            Demand(),
            lifecycle,
        )


class Piece:
    """A piece of the machinery: the parts, by name."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.cfg = parts.cfg
        self.systemd = parts.systemd
        self.gpus = parts.gpus
        self.catalog = parts.catalog
        self.store = parts.store
        self.retiring = parts.retiring
        self.table = parts.table
        self.loads = parts.loads
        self.probes = parts.probes
        self.feed = parts.feed
        self.tasks = parts.tasks
        self.demand = parts.demand
