"""A supervisor over a fake bus and simulated GPUs (10 GB), no systemd."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ssw.config import Config
from ssw.loader.gpus import make_gpu_source
from ssw.loader.models.catalog import Catalog
from ssw.loader.models.registry import Registry
from ssw.loader.store import FactStore, Retiring
from ssw.loader.workers.parts import Parts
from ssw.loader.workers.supervisor import Supervisor
from tests.unit.loader.workers.fakes import FakeBus, spec


@pytest.fixture
async def supervisor(tmp_path: Path) -> AsyncIterator[Supervisor]:
    # Socket paths must fit sun_path: a short directory of its own, not under tmp_path.
    run = Path(tempfile.mkdtemp(prefix="ssw-"))
    cfg = Config.model_validate(
        {
            "state_dir": str(tmp_path),
            "gpus": {"source": "simulated", "simulated": [{"memory_gb": 10}]},
            "workers": {"drain_timeout_s": 1.2, "socket_dir": str(run)},
        }
    )
    parts = Parts.build(
        cfg,
        FakeBus(),  # type: ignore[arg-type]
        make_gpu_source(cfg.gpus),
        Catalog(Registry(models={"a": spec("a"), "b": spec("b")}, aliases={})),
        FactStore(tmp_path / "facts.json"),
        Retiring(tmp_path / "retiring.json"),
    )
    sup = Supervisor(parts)
    yield sup
    await sup.close()
    shutil.rmtree(run, ignore_errors=True)
