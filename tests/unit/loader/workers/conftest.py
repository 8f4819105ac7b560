"""A supervisor over a fake bus and simulated GPUs (10 GB), no systemd."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
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

SupervisorFactory = Callable[..., Supervisor]


@pytest.fixture
async def make_supervisor(tmp_path: Path) -> AsyncIterator[SupervisorFactory]:
    """Supervisors with config sections of the test's choosing (merged over the defaults here)."""
    # Socket paths must fit sun_path: a short directory of its own, not under tmp_path.
    run = Path(tempfile.mkdtemp(prefix="ssw-"))
    made: list[Supervisor] = []

    def make(**sections: dict[str, object]) -> Supervisor:
        settings: dict[str, object] = {
            "state_dir": str(tmp_path),
            "gpus": {"source": "simulated", "simulated": [{"memory_gb": 10}]},
            "workers": {"drain_timeout_s": 1.2, "socket_dir": str(run)},
        }
        cfg = Config.model_validate(settings | sections)
        parts = Parts.build(
            cfg,
            FakeBus(),  # type: ignore[arg-type]
            make_gpu_source(cfg.gpus),
            Catalog(Registry(models={"a": spec("a"), "b": spec("b")}, aliases={})),
            FactStore(tmp_path / "facts.json"),
            Retiring(tmp_path / "retiring.json"),
        )
        made.append(Supervisor(parts))
        return made[-1]

    yield make
    for sup in made:
        await sup.close()
    shutil.rmtree(run, ignore_errors=True)


@pytest.fixture
def supervisor(make_supervisor: SupervisorFactory) -> Supervisor:
    return make_supervisor()
