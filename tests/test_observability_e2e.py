"""Metrics against a real Redis and real systemd (fake engine): request records
and /stats, Redis going away and coming back, Prometheus text format, and the
ssw CLI against a running daemon and without one."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ssw.common.redis_sink import RedisSink, RequestRecord
from tests.conftest import Stack, start_stack, stop_stack
from tests.harness.stack import REPO, SSW_VENV, WORK_ROOT, RedisServer, http, wait_for
from tests.harness.sysbox import SysBox

pytestmark = pytest.mark.systemd
CHAT = [{"role": "user", "content": "hi"}]
MODELS = {"alpha": {"path": "fake-a", "vram_gb": 2, "aliases": ["light"]}, "beta": {"path": "fake-b", "vram_gb": 2}}


@pytest.fixture(scope="module")
def stack(sysbox: SysBox, models_root: Path, redis_server: RedisServer) -> Iterator[Stack]:
    s = start_stack(
        sysbox,
        WORK_ROOT / f"observability-{id(sysbox)}",
        models_root,
        MODELS,
        "fake",
        {
            "gpus": {
                "source": "simulated",
                "sample_interval_s": 0.5,
                "simulated": [{"memory_gb": 48}, {"memory_gb": 48}],
            }
        },
        redis_url=redis_server.url,
    )
    assert http("POST", s.admin + "/load", {"model": "alpha"})[0] == 200
    yield s
    stop_stack(s)


def ssw(stack: Stack | None, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    path = config or (stack.config if stack else None)
    return subprocess.run(
        [str(SSW_VENV / "bin/ssw"), "--config", str(path), *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def records(redis_server: RedisServer) -> int:
    return int(redis_server.client().xlen("ssw:requests"))


def model_stats(stack: Stack, model: str) -> dict[str, Any]:
    found: dict[str, Any] = http("GET", stack.admin + "/stats?window=5m")[2]["models"].get(model, {})
    return found


def test_stats_match_what_was_sent(stack: Stack, redis_server: RedisServer) -> None:
    # Counted from here: other tests in this module send requests too.
    before = {m: model_stats(stack, m) for m in ("alpha", "unknown")}
    recorded = records(redis_server)
    url = stack.public + "/v1/chat/completions"
    for _ in range(10):
        assert http("POST", url, {"model": "alpha", "messages": CHAT, "max_tokens": 5})[0] == 200
    for _ in range(4):
        status, _, body = http("POST", url, {"model": "light", "messages": CHAT, "max_tokens": 3, "stream": True})
        assert status == 200
        # The usage chunk ssw asked for is not in the client's stream.
        assert '"usage"' not in body and body.rstrip().endswith("data: [DONE]")
    status, _, body = http(
        "POST",
        url,
        {
            "model": "alpha",
            "messages": CHAT,
            "max_tokens": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert '"usage"' in body  # asked for by the client: kept
    for _ in range(3):
        assert http("POST", url, {"model": "nope", "messages": CHAT})[0] == 404
    wait_for(lambda: records(redis_server) >= recorded + 18, 30, "the records in Redis")

    def added(stats: dict[str, Any], model: str, key: str) -> int:
        return int(stats[key]) - int(before[model].get(key, 0))

    alpha = model_stats(stack, "alpha")
    assert (added(alpha, "alpha", "requests"), added(alpha, "alpha", "errors")) == (15, 0)
    assert added(alpha, "alpha", "completion_tokens") == 10 * 5 + 4 * 3 + 2
    assert added(alpha, "alpha", "prompt_tokens") > 0
    assert 0 < alpha["latency_ms"]["p50"] <= alpha["latency_ms"]["p95"] <= alpha["latency_ms"]["p99"]
    assert alpha["ttft_ms"]["p50"] is not None  # from the streams
    unknown = model_stats(stack, "unknown")  # client text never becomes a label or key
    assert (added(unknown, "unknown", "requests"), added(unknown, "unknown", "errors")) == (3, 3)
    assert unknown["error_rate"] == 1
    print(f"alpha: latency p50 {alpha['latency_ms']['p50']} ms, TTFT p50 {alpha['ttft_ms']['p50']} ms")

    cli = ssw(stack, "stats", "--window", "5m", "--json")
    assert cli.returncode == 0 and json.loads(cli.stdout)["models"]["alpha"]["requests"] == alpha["requests"]
    text = ssw(stack, "stats").stdout
    assert f"alpha: {alpha['requests']} requests, {alpha['errors']} errors" in text


def test_redis_down_costs_no_request_and_writing_resumes(stack: Stack, redis_server: RedisServer) -> None:
    def dropped() -> float:
        families = text_string_to_metric_families(http("GET", stack.gateway_metrics + "/metrics")[2])
        return sum(
            s.value
            for f in families
            if f.name == "ssw_metrics_records_dropped"
            for s in f.samples
            if s.name.endswith("_total")
        )

    before = dropped()
    redis_server.stop()
    started = time.monotonic()
    statuses = [
        http("POST", stack.public + "/v1/chat/completions", {"model": "alpha", "messages": CHAT, "max_tokens": 2})[0]
        for _ in range(20)
    ]
    took = time.monotonic() - started
    assert statuses == [200] * 20
    print(f"20 requests with Redis down: {took * 1000:.0f} ms")
    wait_for(lambda: dropped() > before, 15, "the drop counter to rise")
    assert "metrics: dropped" in stack.gateway.log()

    redis_server.start()  # same port, empty
    for _ in range(3):
        assert (
            http("POST", stack.public + "/v1/chat/completions", {"model": "alpha", "messages": CHAT, "max_tokens": 2})[
                0
            ]
            == 200
        )
    wait_for(lambda: records(redis_server) >= 3, 15, "new records after Redis came back")


async def test_a_long_request_ending_after_a_later_one_is_still_recorded(redis_server: RedisServer) -> None:
    sink = RedisSink(redis_server.url, prefix="ssw-order:")
    now = time.time()

    def rec(started: float) -> RequestRecord:
        return RequestRecord(started, "alpha", "ssw-worker@alpha.service", "interactive", 200, 1, None, 1, 1, "", False)

    sink.record(rec(now))
    assert await sink._flush()
    sink.record(rec(now - 60))  # a stream that began a minute earlier and just ended
    assert await sink._flush()
    await sink.close()
    assert (sink.written, sink.dropped) == (2, 0)
    assert redis_server.client().xlen("ssw-order:requests") == 2


def test_prometheus_endpoints_parse_and_carry_the_series(stack: Stack) -> None:
    url = stack.public + "/v1/chat/completions"
    assert http("POST", url, {"model": "alpha", "messages": CHAT, "max_tokens": 2})[0] == 200
    wait_for(
        lambda: (
            'ssw_requests_total{model="alpha",route="/v1/chat/completions",status="200"}'
            in http("GET", stack.gateway_metrics + "/metrics")[2]
        ),
        10,
        "the request in the gateway's metrics",
    )
    ready = sum(w["state"] == "ready" for w in stack.status()["workers"])
    loader_text = http("GET", stack.admin + "/metrics")[2]
    gateway_text = http("GET", stack.gateway_metrics + "/metrics")[2]
    names = {f.name for f in text_string_to_metric_families(loader_text)}
    names |= {f.name for f in text_string_to_metric_families(gateway_text)}
    for series in (
        "ssw_requests",
        "ssw_request_duration_seconds",
        "ssw_time_to_first_token_seconds",
        "ssw_prompt_tokens",
        "ssw_completion_tokens",
        "ssw_waiting_requests",
        "ssw_workers",
        "ssw_loads",
        "ssw_load_duration_seconds",
        "ssw_evictions",
        "ssw_gpu_memory_total_bytes",
        "ssw_gpu_memory_used_bytes",
        "ssw_gpu_memory_reserved_bytes",
        "ssw_metrics_records_dropped",
    ):
        assert series in names, series
    assert 'ssw_requests_total{model="alpha",route="/v1/chat/completions",status="200"}' in gateway_text
    assert f'ssw_workers{{state="ready"}} {ready:.1f}' in loader_text
    assert 'ssw_loads_total{model="alpha",result="ready"} 1.0' in loader_text
    assert 'ssw_gpu_memory_total_bytes{gpu="0"} 4.8e+10' in loader_text
    # Each role's own footprint, as its process sees it.
    for text in (loader_text, gateway_text):
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert families["process_resident_memory_bytes"].samples[0].value > 10 * 2**20
        assert families["process_open_fds"].samples[0].value > 0


def test_gpu_samples_reach_status_and_redis(stack: Stack, redis_server: RedisServer) -> None:
    r = redis_server.client()
    wait_for(lambda: r.xlen("ssw:gpu:0") > 0, 30, "GPU samples in Redis")
    sample: dict[Any, Any] = r.xrevrange("ssw:gpu:0", count=1)[0][1]
    assert int(sample[b"memory_total_bytes"]) == 48 * 10**9
    gpu0 = stack.status()["gpus"][0]
    assert gpu0["temperature_c"] is None and gpu0["power_w"] is None  # unknown when simulated


def test_cli_verbs_against_the_running_daemon(stack: Stack) -> None:
    st = ssw(stack, "status")
    assert st.returncode == 0 and "ssw-worker@alpha.service: ready on GPU 0" in st.stdout
    # alpha's 2.95 GB of 48: one '#' of 24, the rest free.
    assert "GPU 0 Simulated GPU (simulated) [#......................." in st.stdout
    assert json.loads(ssw(stack, "status", "--json").stdout)["workers"][0]["model"] == "alpha"
    models = json.loads(ssw(stack, "models", "--json").stdout)
    assert models["alpha"] == {"aliases": ["light"], "pinned": False, "ready": True, "load": "idle"}
    assert "beta: not loaded" in ssw(stack, "models").stdout
    load = ssw(stack, "load", "beta", "--gpu", "1")
    assert load.returncode == 0 and "beta: ready in" in load.stdout
    assert next(w for w in stack.status()["workers"] if w["model"] == "beta")["gpus"] == [1]
    logs = ssw(stack, "logs", "beta", "-n", "5")
    assert logs.returncode == 0 and "fake engine for" in logs.stdout
    unload = ssw(stack, "unload", "beta", "--json")
    assert json.loads(unload.stdout)["stopped"] == ["ssw-worker@beta.service"]
    check = ssw(stack, "check-config")
    assert check.returncode == 0 and "alpha (aliases: light)" in check.stdout and "valid" in check.stdout
    assert ssw(stack, "load", "nope").returncode == 4


def test_cli_says_clearly_when_no_daemon_runs(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("admin: {host: 127.0.0.1, port: 1}\n")
    for verb in (["status"], ["models"], ["load", "x"], ["unload", "x"], ["logs", "x"], ["stats"]):
        result = ssw(None, *verb, config=config)
        assert result.returncode == 5, (verb, result.stderr)
        assert "cannot reach the loader" in result.stderr and "is ssw-loader running?" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpus: {source: cuda}\n")
    result = ssw(None, "check-config", config=bad)
    assert result.returncode == 3 and "gpus.source" in result.stderr
