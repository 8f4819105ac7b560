"""The benchmark scripts run (briefly) against the stack, so they cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Stack, start_stack, stop_stack
from tests.harness.stack import REPO, WORK_ROOT, http
from tests.harness.sysbox import SysBox

pytestmark = pytest.mark.systemd


@pytest.fixture(scope="module")
def stack(sysbox: SysBox, models_root: Path) -> Iterator[Stack]:
    s = start_stack(
        sysbox, WORK_ROOT / f"bench-{id(sysbox)}", models_root, {"alpha": {"path": "fake-a", "vram_gb": 2}}, "fake"
    )
    assert http("POST", s.admin + "/load", {"model": "alpha"})[0] == 200
    yield s
    stop_stack(s)


def loadtest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "bench/loadtest.py"), "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def test_loadtest_sweep_writes_json_and_a_plot(stack: Stack, tmp_path: Path) -> None:
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    result = loadtest(
        "--plot",
        str(png),
        "--url",
        stack.public,
        "--model",
        "alpha",
        "--concurrency",
        "1,4",
        "--requests",
        "20",
        "--stream",
        "--max-tokens",
        "8",
        "--json",
        str(out),
    )
    print(result.stdout)
    assert result.returncode == 0, result.stderr
    runs = json.loads(out.read_text())["runs"]
    assert [(r["concurrency"], r["ok"], r["errors"]) for r in runs] == [(1, 20, {}), (4, 20, {})]
    assert all(r["output_tokens_per_s"] > 0 and r["ttft_ms"]["p50"] is not None for r in runs)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loadtest_ab_reports_the_gateways_overhead(stack: Stack, tmp_path: Path) -> None:
    worker = next(w for w in stack.status()["workers"] if w["model"] == "alpha")
    out = tmp_path / "ab.json"
    result = loadtest(
        "--ab",
        worker["url"],
        stack.public,
        "--model",
        "alpha",
        "--concurrency",
        "4",
        "--requests",
        "30",
        "--rounds",
        "2",
        "--max-tokens",
        "8",
        "--json",
        str(out),
    )
    print(result.stdout)
    assert result.returncode == 0, result.stderr
    run = json.loads(out.read_text())["runs"][0]
    assert len(run["rounds"]["A"]) == len(run["rounds"]["B"]) == 2
    assert run["throughput_ratio"] > 0 and "added_p50_ms" in run


def test_control_plane_bench_runs(tmp_path: Path) -> None:
    out = tmp_path / "cp.json"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench/control_plane.py"),
            "--models",
            "50",
            "--gpus",
            "8",
            "--residents",
            "100",
            "--decisions",
            "200",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    assert figures["scan"]["models"] == 50 and figures["placement"]["residents"] == 100
    assert figures["placement"]["decisions"] == 200
