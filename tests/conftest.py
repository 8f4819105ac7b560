from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness.stack import (
    ADMIN_TOKENS,
    REPO,
    SSW_VENV,
    WORK_ROOT,
    RedisServer,
    Role,
    free_port,
    http,
    tiny_model_dir,
    wait_for,
    write_config,
)
from tests.harness.sysbox import SysBox

QWEN2_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "max_position_embeddings": 2048,
    "torch_dtype": "bfloat16",
}


def make_model_dir(
    path: Path, config: dict[str, Any], weight_bytes: int = 1 << 20, files: tuple[str, ...] = ("model.safetensors",)
) -> Path:
    """A model directory with a real-looking config.json and sparse weight files (no disk cost)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    for name in files:
        with (path / name).open("wb") as f:
            f.truncate(weight_bytes // len(files))
    return path


@pytest.fixture(scope="session")
def models_root() -> Iterator[Path]:
    root = WORK_ROOT / f"models-{os.getpid()}"
    root.mkdir(parents=True, exist_ok=True)
    make_model_dir(root / "fake-a", QWEN2_CONFIG)
    make_model_dir(root / "fake-b", QWEN2_CONFIG)
    make_model_dir(root / "fake-qwen3", {**QWEN2_CONFIG, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"})
    make_model_dir(root / "fake-broken", QWEN2_CONFIG)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """A tiny random Qwen2 model made locally (kept between runs: it is deterministic)."""
    return tiny_model_dir()


@pytest.fixture(scope="module")
def redis_server(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A real Redis of the test module's own (its data in a directory named after it)."""
    server = RedisServer(WORK_ROOT / f"redis-{request.module.__name__.rsplit('.', 1)[-1]}").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sysbox() -> Iterator[SysBox]:
    # The tests' work root is shared with the host: worker sockets, models, configs.
    box = SysBox.boot(share=(WORK_ROOT,))
    yield box
    box.stop()


@dataclass
class Stack:
    box: SysBox
    dir: Path
    config: Path
    public: str
    admin: str
    loader: Role
    gateway: Role
    gateway_metrics: str

    def status(self) -> dict[str, Any]:
        return http("GET", self.admin + "/status")[2]

    def unit_show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.box.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def load(self, model: str) -> dict[str, Any]:
        """The model ready, whatever the tests before this one did."""
        status, _, body = http("POST", self.admin + "/load", {"model": model}, timeout=120)
        assert status == 200, body
        loaded: dict[str, Any] = body
        return loaded

    def unload(self, model: str) -> None:
        """The model with no worker, whatever the tests before this one did."""
        http("POST", self.admin + "/unload", {"model": model}, timeout=120)
        wait_for(lambda: not any(w["model"] == model for w in self.status()["workers"]), 60, f"{model} unloaded")

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """The `ssw` command line against this stack, as an operator runs it."""
        return subprocess.run(
            [str(SSW_VENV / "bin/ssw"), "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=timeout,
        )

    def add_key(self, name: str, *extra: str) -> str:
        """A new API key (`ssw keys add`), its secret as printed once."""
        added = self.cli("keys", "add", name, *extra)
        assert added.returncode == 0, added.stderr
        return added.stdout.strip()

    def restart(self, role: Role) -> None:
        role.start().wait_healthy(self.public if role is self.gateway else self.admin)
        wait_for(lambda: http("GET", self.public + "/health")[2].get("loader_connected"), 30, "the loader connection")


def start_stack(
    box: SysBox,
    directory: Path,
    models_dir: Path,
    models: dict[str, Any],
    engine: str,
    extra: dict[str, Any] | None = None,
    redis_url: str | None = None,
    splits: dict[str, Any] | None = None,
) -> Stack:
    public_port, admin_port, metrics_port = free_port(), free_port(), free_port()
    extra = dict(extra or {})
    extra["gateway"] = {**extra.get("gateway", {}), "metrics_listen": {"host": "127.0.0.1", "port": metrics_port}}
    config = write_config(
        directory,
        bus_address=box.bus_address,
        journal_dir=box.journal_dir,
        models_dir=models_dir,
        models=models,
        engine=engine,
        public_port=public_port,
        admin_port=admin_port,
        extra=extra,
        splits=splits,
        **({"redis_url": redis_url} if redis_url else {}),
    )
    public, admin = f"http://127.0.0.1:{public_port}", f"http://127.0.0.1:{admin_port}"
    ADMIN_TOKENS[admin] = directory / "admin.token"
    loader = Role("loader", config, directory).start().wait_healthy(admin)
    gateway = Role("gateway", config, directory).start().wait_healthy(public)
    # Healthy is not yet connected: wait for the loader's first snapshot.
    wait_for(lambda: http("GET", public + "/health")[2].get("loader_connected"), 30, "the gateway to reach the loader")
    return Stack(box, directory, config, public, admin, loader, gateway, f"http://127.0.0.1:{metrics_port}")


# Every cold load the tests' loaders reported with the ETA it had (the median of the
# model's earlier loads): (measured s, expected s). Summed up at the end of the run.
ETA_LINE = re.compile(r"healthy after (\d+\.\d) s \(expected (\d+\.\d) s\)")
ETA_SAMPLES: list[tuple[float, float]] = []


def stop_stack(stack: Stack) -> None:
    """Stop both roles; a Traceback in either's log fails the test module: the
    roles never log one for anything but a bug."""
    stack.gateway.stop()
    stack.loader.stop()
    ETA_SAMPLES.extend((float(a), float(b)) for a, b in ETA_LINE.findall(stack.loader.log()))
    broken = []
    for role in (stack.loader, stack.gateway):
        log = role.log()
        if "Traceback" in log:
            print(f"--- {role.role} log ---\n{log}")
            broken.append(role.role)
    assert not broken, f"Traceback in the log of: {', '.join(broken)} (printed above)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under CI (or SSW_TEST_ORDER=reverse) each module's tests run in reverse
    order: an end-to-end test must set up what it needs and not lean on the
    tests before it in its file. Locally they run in file order, so both orders
    are exercised."""
    if os.environ.get("SSW_TEST_ORDER", "reverse" if os.environ.get("CI") else "file") != "reverse":
        return
    by_module: dict[str, list[pytest.Item]] = {}
    for item in items:
        by_module.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    items[:] = [item for module in by_module.values() for item in reversed(module)]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The ETA's error against the actual load time, over every load the tests made of
    a model loaded before (issue 27): what a waiting client's ETA is worth."""
    if not ETA_SAMPLES:
        return
    errors = sorted(abs(actual - expected) for actual, expected in ETA_SAMPLES)
    relative = sorted(abs(actual - expected) / max(actual, 0.1) for actual, expected in ETA_SAMPLES)
    figures = {
        "loads": len(errors),
        "abs_error_s": {
            "p50": round(statistics.median(errors), 2),
            "p90": round(errors[int(len(errors) * 0.9)], 2),
            "max": round(errors[-1], 2),
        },
        "relative_error": {
            "p50": round(statistics.median(relative), 3),
            "p90": round(relative[int(len(relative) * 0.9)], 3),
        },
    }
    terminalreporter.write_line(f"load ETA against the actual load time: {json.dumps(figures)}")
    out = REPO / ".cache" / "eta-errors.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({**figures, "samples": ETA_SAMPLES}, indent=1) + "\n")
