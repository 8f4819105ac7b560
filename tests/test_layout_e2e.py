"""The shipped models.yaml on two simulated 48 GB A40s with the seed models'
real config.json and weight sizes: the pinned models load at start into the
reference layout, and every started unit carries its placement."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import yaml

from tests.conftest import Stack, start_stack, stop_stack
from tests.harness.stack import REPO, WORK_ROOT, wait_for
from tests.harness.sysbox import SysBox
from tests.seed_models import make_seed_model

pytestmark = pytest.mark.systemd
GB = 10**9


@pytest.fixture(scope="module")
def stack(sysbox: SysBox) -> Iterator[Stack]:
    models_dir = WORK_ROOT / f"seed-models-{id(sysbox)}"
    for name in ("Qwen2.5-14B-Instruct-AWQ", "Qwen3-4B-AWQ"):
        make_seed_model(models_dir, name)
    models = yaml.safe_load((REPO / "models.yaml").read_text())["models"]
    s = start_stack(sysbox, WORK_ROOT / f"layout-{id(sysbox)}", models_dir, models, "fake")
    yield s
    stop_stack(s)


def test_pinned_models_load_at_start_into_the_reference_layout(stack: Stack) -> None:
    def all_ready() -> bool:
        ws = stack.status()["workers"]
        return len(ws) == 4 and all(w["state"] == "ready" for w in ws)

    wait_for(all_ready, 60, "the four pinned workers")
    st = stack.status()
    layout = sorted((w["unit"], tuple(w["gpus"])) for w in st["workers"])
    assert layout == [
        ("ssw-worker@qwen2.5-14b.service", (0,)),
        ("ssw-worker@qwen2.5-14b:2.service", (1,)),
        ("ssw-worker@qwen3-4b.service", (0,)),
        ("ssw-worker@qwen3-4b:2.service", (1,)),
    ]
    for gpu in st["gpus"]:
        print(
            f"GPU {gpu['index']}: {gpu['memory_free_bytes'] / GB:.2f} GB free of {gpu['memory_total_bytes'] / GB:.0f}"
        )
        assert abs(gpu["memory_free_bytes"] - 20.9 * GB) < 0.05 * GB
        assert gpu["memory_reserved_bytes"] == 0


def test_units_carry_their_gpu_and_memory_fraction(stack: Stack) -> None:
    for w in stack.status()["workers"]:
        props = stack.unit_show(w["unit"], "Environment", "ExecStart")
        env = dict(item.split("=", 1) for item in props["Environment"].split())
        assert env["CUDA_VISIBLE_DEVICES"] == str(w["gpus"][0])
        fraction = w["vram_budget_bytes"] / (48 * GB)
        assert f"--gpu-memory-utilization {fraction:.4f}" in props["ExecStart"]
    heavy = next(w for w in stack.status()["workers"] if w["model"] == "qwen2.5-14b")
    assert heavy["vram_budget_bytes"] == int(18.4 * GB) + int(0.95 * GB)
