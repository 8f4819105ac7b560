"""The benchmark scripts run (briefly) against the stack, so they cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Stack, start_stack, stop_stack
from tests.harness.stack import REPO, WORK_ROOT, RedisServer, http
from tests.harness.sysbox import SysBox

pytestmark = pytest.mark.systemd


@pytest.fixture(scope="module")
def stack(sysbox: SysBox, models_root: Path, redis_server: RedisServer) -> Iterator[Stack]:
    # cold and swap fit on GPU 1 only one at a time, so loading swap evicts cold.
    slow = {"path": "fake-b", "vram_gb": 30, "gpus": [1], "env": {"SSW_FAKE_LOAD_DELAY": "0.5"}}
    # paced: the demo's bench-fake-paced, run as the demo runs it (models.yaml's python).
    paced = {
        "path": "fake-a",
        "vram_gb": 1,
        "gpus": [0],
        "python": str(REPO / "tests/harness/fake-python"),
        "env": {"SSW_FAKE_TPS": "500"},
    }
    # relay: also on TCP inside its network namespace, for bench/relay.py's baseline.
    relay = {"path": "fake-a", "vram_gb": 1, "gpus": [0], "env": {"SSW_FAKE_TCP_PORT": "18080"}}
    models = {
        "alpha": {"path": "fake-a", "vram_gb": 2, "gpus": [0]},
        "embed": {"path": "fake-a", "vram_gb": 1, "gpus": [0], "runner": "pooling", "convert": "embed"},
        "cold": slow,
        "swap": slow,
        "paced": paced,
        "relay": relay,
        # The warm tier: one evicts the other, which sleeps.
        "sleepy-a": {**slow, "sleep": True},
        "sleepy-b": {**slow, "sleep": True},
        # The demo's bench-fake-busy: finite room and priority scheduling, as a GPU.
        "busy": {
            "path": "fake-a",
            "vram_gb": 1,
            "gpus": [0],
            "scheduling_policy": "priority",
            "env": {"SSW_FAKE_TPS": "200", "SSW_FAKE_MAX_SEQS": "4"},
        },
    }
    s = start_stack(sysbox, WORK_ROOT / f"bench-{id(sysbox)}", models_root, models, "fake", redis_url=redis_server.url)
    assert http("POST", s.admin + "/load", {"model": "alpha"})[0] == 200
    yield s
    stop_stack(s)


def bench(script: str, *args: str, timeout: float = 300) -> str:
    """Runs a bench script to success and gives back what it printed."""
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    print(result.stdout)
    assert result.returncode == 0, result.stderr
    return result.stdout


def loadtest(*args: str) -> str:
    return bench("loadtest.py", "--quiet", *args)


def admin(stack: Stack) -> list[str]:
    """Where the scripts find the stack's admin API, and its token."""
    return ["--admin", stack.admin, "--admin-token-file", str(stack.dir / "admin.token")]


def test_loadtest_sweep_writes_json_and_a_plot(stack: Stack, tmp_path: Path) -> None:
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    loadtest(
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
    runs = json.loads(out.read_text())["runs"]
    assert [(r["concurrency"], r["ok"], r["errors"]) for r in runs] == [(1, 20, {}), (4, 20, {})]
    assert all(r["output_tokens_per_s"] > 0 and r["ttft_ms"]["p50"] is not None for r in runs)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_paced_fake_engine_streams_token_by_token(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "paced.json"
    loadtest(
        "--ab", "worker", stack.public, *admin(stack),
        "--model", "paced", "--concurrency", "2", "--requests", "4", "--rounds", "1", "--warmup", "2",
        "--stream", "--max-tokens", "10", "--json", str(out),
    )  # fmt: skip
    run = json.loads(out.read_text())["runs"][0]
    # 500 tokens/s: about 2 ms between tokens, on both sides of the gateway.
    for side in ("A", "B"):
        itl = run["rounds"][side][0]["itl_ms"]["p50"]
        assert 1.0 <= itl <= 50, (side, itl)
    unit = next(w["unit"] for w in stack.status()["workers"] if w["model"] == "paced")
    argv = stack.unit_show(unit, "ExecStart")["ExecStart"]
    assert "tests/harness/fake-python" in argv


def test_loadtest_results_carry_no_key(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    secret = "sk-never-in-results"
    loadtest(
        "--url", stack.public, "--model", "alpha", "--requests", "2", "--concurrency", "1",
        "--api-key", secret, "--header", f"X-Token:{secret}", "--json", str(out),
    )  # fmt: skip
    text = out.read_text()
    assert secret not in text and json.loads(text)["args"]["api_key"] == "<redacted>"


def test_loadtest_ab_reports_the_gateways_overhead(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "ab.json"
    stdout = loadtest(
        "--ab",
        "worker",  # found through the admin API
        stack.public,
        *admin(stack),
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
    worker = next(w for w in stack.status()["workers"] if w["model"] == "alpha")
    assert f"A: alpha's worker at unix:{worker['socket']}" in stdout
    assert (stack.dir / "admin.token").read_text().strip() not in out.read_text()
    run = json.loads(out.read_text())["runs"][0]
    assert len(run["rounds"]["A"]) == len(run["rounds"]["B"]) == 2
    assert run["throughput_ratio"] > 0 and "added_p50_ms" in run


def test_loads_bench_times_a_cold_load_a_swap_and_waiters(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "loads.json"
    bench(
        "loads.py",
        "--url",
        stack.public,
        *admin(stack),
        "--cold",
        "cold",
        "--swap",
        "swap",
        "--waiters",
        "50",
        "--json",
        str(out),
    )
    figures = json.loads(out.read_text())
    for step in ("cold", "swap"):
        phases = figures[step]["phases_s"]
        assert list(phases) == [
            "request_to_loader",
            "placement",
            "eviction",
            "unit_start",
            "process_up",
            "engine_ready",
            "first_token",
        ]
        # The fake engine's 0.5 s load delay is vLLM's own time.
        assert figures[step]["vllm_own_s"] >= 0.5
        assert figures[step]["to_first_token_s"] == pytest.approx(sum(phases.values()), abs=0.01)
    assert figures["swap"]["evictions"] == 1
    waiters = figures["waiters"]
    assert (waiters["clients"], waiters["served"], waiters["errors"]) == (50, 50, [])
    assert waiters["healthy_to_last_answer_s"] >= waiters["healthy_to_first_answer_s"] >= 0


def test_loads_bench_times_a_swap_back_to_a_sleeping_model(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "loads.json"
    printed = bench(
        "loads.py",
        "--url",
        stack.public,
        *admin(stack),
        "--worker-root",
        str(stack.box.root),
        "--cold",
        "sleepy-a",
        "--cold-cache",
        "clear",
        "--swap",
        "sleepy-b",
        "--swap-back",
        "--json",
        str(out),
    )
    assert "cold load with no compile cache" in printed and "ssw/sleepy-a removed" in printed
    back = json.loads(out.read_text())["swap_back"]
    assert back["tier"] == "sleeping (level 1)" and back["unit"] == "ssw-worker@sleepy-a.service"
    assert list(back["phases_s"]) == ["request_to_loader", "placement", "eviction", "wake_and_canary", "first_token"]
    assert back["phases_s"]["wake_and_canary"] >= 0.5  # the fake engine's wake
    assert back["to_first_token_s"] == pytest.approx(sum(back["phases_s"].values()), abs=0.01)


def test_gateway_memory_bench_holds_connections_and_waiters(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    bench(
        "gateway_memory.py",
        "--url",
        stack.public,
        "--metrics",
        stack.gateway_metrics + "/metrics",
        *admin(stack),
        "--connections",
        "300",
        "--batch",
        "100",
        "--waiters",
        "40",
        "--waiters-model",
        "swap",
        "--json",
        str(out),
    )
    figures = json.loads(out.read_text())
    conns = figures["connections"]
    assert (conns["held"], conns["errors"]) == (300, {})
    # The gateway itself holds a descriptor for each idle connection.
    assert conns["gateway_open_fds_held"] >= 300
    assert conns["rss_held_mib"] > 0
    waiters = figures["waiters"]
    assert waiters["seen_waiting"] == 40 and waiters["answers"] == {"200": 40}


def test_control_plane_bench_runs(tmp_path: Path) -> None:
    out = tmp_path / "cp.json"
    bench(
        "control_plane.py",
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
        timeout=120,
    )
    figures = json.loads(out.read_text())
    assert figures["scan"]["models"] == 50 and figures["placement"]["residents"] == 100
    assert figures["placement"]["decisions"] == 200


def test_relay_runs_every_peer_side_by_side(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "relay.json"
    stdout = bench(
        "relay.py",
        "--config",
        str(stack.config),
        *admin(stack),
        "--model",
        "relay",
        "--workloads",
        "short,stream",
        "--targets",
        "direct,nginx,ssw,ssw-plain,litellm",
        "--processes",
        "1,2",
        "--connections",
        "8",
        "--duration",
        "1",
        "--rounds",
        "1",
        "--latency-duration",
        "1",
        "--json",
        str(out),
        "--plot",
        str(tmp_path / "relay.png"),
        timeout=900,
    )
    results = json.loads(out.read_text())
    for workload in ("short", "stream"):
        targets = results["workloads"][workload]["targets"]
        assert set(targets) == {"direct", "nginx", "ssw-1p", "ssw-2p", "ssw-plain-1p", "litellm"}, targets
        for name, t in targets.items():
            assert t["rps_median"] > 0 and t["errors"] == 0, (workload, name, t)
    assert set(results["workloads"]["short"]["one_connection"]) == {"direct", "nginx", "ssw-1p", "ssw-plain-1p"}
    assert "= " in stdout and "x nginx" in stdout and (tmp_path / "relay.png").stat().st_size > 0


def test_routes_bench_compares_every_route_family_with_the_worker(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "routes.json"
    printed = bench(
        "routes.py",
        *admin(stack),
        "--gateway",
        stack.public.removeprefix("http://"),
        "--generate-models",
        "alpha",
        "--pooling-models",
        "embed",
        "--requests",
        "5",
        "--rounds",
        "1",
        "--stream-model",
        "paced",
        "--stream-tokens",
        "32",
        "--stream-requests",
        "2",
        "--json",
        str(out),
    )
    results = json.loads(out.read_text())
    rows = results["routes"]
    assert {r["family"] for r in rows} == {
        "chat", "completions", "responses", "messages", "tokenize", "embeddings", "pooling", "score", "rerank"
    }  # fmt: skip
    assert all(r["direct_p50_ms"] > 0 and r["ssw_p50_ms"] > 0 for r in rows)
    # Ollama's routes, where they have the same request.
    assert {r["family"]: r["ollama_path"] for r in rows if "ollama_p50_ms" in r} == {
        "chat": "/api/chat", "completions": "/api/generate", "embeddings": "/api/embed"
    }  # fmt: skip
    assert results["stream"]["v1_tokens_per_s"] > 0 and results["stream"]["ollama_tokens_per_s"] > 0
    assert "added" in printed and "/api/chat" in printed


def test_batch_bench_measures_interactive_latency_beside_a_batch(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "batch.json"
    stdout = bench(
        "batch.py",
        "--url",
        stack.public,
        "--model",
        "busy",
        "--lines",
        "24",
        "--line-tokens",
        "8",
        "--seconds",
        "1.5",
        "--rps",
        "4",
        "--naive-concurrency",
        "4",
        "--json",
        str(out),
        timeout=300,
    )
    phases = json.loads(out.read_text())["phases"]
    assert set(phases) == {"alone", "ssw_batch", "naive"}
    for phase in phases.values():
        assert phase["interactive"]["requests"] >= 5 and phase["interactive"]["p99_ms"] > 0
    assert phases["ssw_batch"]["background"]["completed"] == 24 and phases["ssw_batch"]["background"]["lines_per_s"] > 0
    assert phases["naive"]["background"]["lines"] == 24
    assert "ssw_batch" in stdout and "lines/s" in stdout


def test_fleet_bench_measures_the_hop_and_single_flight(models_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "fleet.json"
    stdout = bench(
        "fleet.py",
        "--models-dir",
        str(models_root),
        "--requests",
        "50",
        "--rounds",
        "1",
        "--clients",
        "10",
        "--load-delay",
        "0.5",
        "--json",
        str(out),
        timeout=300,
    )
    figures = json.loads(out.read_text())
    assert figures["hop"]["requests"] == 50 and figures["hop"]["a_to_b"]["p50_ms"] > 0
    assert figures["hop_plain"]["requests"] == 50 and figures["hop_plain"]["a_to_b"]["p50_ms"] > 0
    assert figures["claim"]["make_us"] > 0 and figures["claim"]["check_us"] > 0
    assert figures["single_flight"]["units_started"] == 1 and figures["single_flight"]["workers_after"] == 1
    assert "the hop adds" in stdout and "over TLS" in stdout


def test_scheduling_bench_runs_today_and_the_policy_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "scheduling.json"
    stdout = bench(
        "scheduling.py",
        "--seconds",
        "8",
        "--isolation-seconds",
        "2",
        "--deadline-rounds",
        "1",
        "--load-delay",
        "1",
        "--json",
        str(out),
        timeout=600,
    )
    figures = json.loads(out.read_text())
    for name in ("today", "policy"):
        thrash = figures[name]["thrash"]
        assert thrash["completed"] > 0 and thrash["p50_ms"] > 0 and set(thrash["per_model"]) == {"swap-a", "swap-b"}
        assert {"alone", "beside_interactive", "beside_batch"} <= set(figures[name]["isolation"])
        assert figures[name]["isolation"]["alone"]["n"] > 0
    deadline = figures["policy"]["deadline"]
    assert deadline["with_deadline"]["n"] == 1 and deadline["served_by_fallback"] == 1
    assert "the policy completes" in stdout and "time to first token" in stdout


def test_groups_bench_runs_a_model_across_two_hosts_beside_one_host() -> None:
    out = bench("groups.py", "--engine", "fake", "--loads", "1", "--tokens", "8", "--streams", "2", timeout=600)
    assert "a model across two hosts" in out and "cold start      one host [" in out, out
