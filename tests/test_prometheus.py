"""What ssw ships for Prometheus and Grafana, tried for real: the alert rules pass
`promtool test rules` (Debian's prometheus package), and every query of the Grafana
dashboard, run by a real Prometheus that scrapes a test stack (gateway and loader,
real systemd, the fake engine) after it served, loaded, evicted, slept, woke and
failed, returns data."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Stack, start_stack, stop_stack
from tests.harness.stack import REPO, WORK_ROOT, RedisServer, free_port, http, wait_for
from tests.harness.sysbox import SysBox

RULES = REPO / "etc/prometheus"
DASHBOARD = REPO / "etc/grafana/ssw-dashboard.json"
CHAT = [{"role": "user", "content": "hi"}]
SLEEPER = {"path": "fake-a", "vram_gb": 6, "gpus": [0], "sleep": True, "env": {"SSW_FAKE_LOAD_DELAY": "0.5"}}
MODELS = {
    "npc": {"path": "fake-a", "vram_gb": 2, "gpus": [1], "pinned": True},
    "a": SLEEPER,
    "b": SLEEPER,
    "broken": {"path": "fake-broken", "vram_gb": 1, "gpus": [1], "env": {"SSW_FAKE_FAIL": "exit-on-start"}},
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=RULES, timeout=120)


def test_the_alert_rules_are_valid_and_pass_their_tests() -> None:
    checked = promtool("check", "rules", "ssw-rules.yml", "ssw-thresholds.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "ssw-rules.test.yml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    # Every alert the issue asks for is there, and each has a test that fires it.
    groups = yaml.safe_load((RULES / "ssw-rules.yml").read_text())["groups"]
    alerts = [r["alert"] for g in groups for r in g["rules"] if "alert" in r]
    assert len(alerts) == 10
    fired = {
        t["alertname"]
        for case in yaml.safe_load((RULES / "ssw-rules.test.yml").read_text())["tests"]
        for t in case.get("alert_rule_test", [])
        if t["exp_alerts"]
    }
    assert set(alerts) == fired, set(alerts) ^ fired


@pytest.fixture(scope="module")
def stack(sysbox: SysBox, models_root: Path, redis_server: RedisServer) -> Iterator[Stack]:
    extra = {
        "gpus": {
            "source": "simulated",
            "simulated": [{"memory_gb": 10, "utilization_pct": 40}, {"memory_gb": 10, "utilization_pct": 70}],
        },
        "placement": {"runtime_overhead_gb": 0, "sleep_ram_gb": 2},
        "workers": {"freed_timeout_s": 2, "sleep_residual_gb": 0.5},
    }
    s = start_stack(sysbox, WORK_ROOT / f"prom-{id(sysbox)}", models_root, MODELS, "fake", extra, redis_server.url)
    yield s
    stop_stack(s)


@pytest.fixture(scope="module")
def prometheus(stack: Stack) -> Iterator[str]:
    """A real Prometheus scraping the stack every second, with ssw's rules loaded."""
    assert shutil.which("prometheus"), "Debian's prometheus package (tests/harness/bootstrap.sh installs it)"
    root = stack.dir / "prometheus"
    root.mkdir(exist_ok=True)
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES / "ssw-rules.yml"), str(RULES / "ssw-thresholds.yml")],
        "scrape_configs": [
            {
                "job_name": "ssw",
                "static_configs": [{"targets": [stack.gateway_metrics.removeprefix("http://")]}],
            },
            {
                # The loader's /metrics needs no token (as Ansible's Prometheus scrapes it).
                "job_name": "ssw-loader",
                "static_configs": [{"targets": [stack.admin.removeprefix("http://")]}],
            },
        ],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (root / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: targets_up(url) == 2, 60, "Prometheus to scrape both roles")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def targets_up(url: str) -> int:
    try:
        active = http("GET", url + "/api/v1/targets")[2]["data"]["activeTargets"]
    except (OSError, KeyError, TypeError):
        return 0
    return sum(1 for t in active if t["health"] == "up")


def query(url: str, expr: str) -> list[dict[str, Any]]:
    status, _, body = http("GET", url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert status == 200 and body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def has_data(url: str, expr: str) -> bool:
    """At least one series with a number (histogram_quantile over no observations is NaN)."""
    return any(not math.isnan(float(r["value"][1])) for r in query(url, expr))


def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        for target in panel["targets"]:
            # Grafana's variables as an operator's "All" and a short range fill them.
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$host", ".*").replace("$model", ".*")
            out.append((panel["title"], expr))
    return out


def work(stack: Stack) -> None:
    """A little of everything the dashboard shows, each at least twice: a series is born
    with its first value, and increase() over it counts from there."""
    url = stack.public + "/v1/chat/completions"

    def chat(model: str) -> None:
        assert http("POST", url, {"model": model, "messages": CHAT, "max_tokens": 2}, timeout=120)[0] == 200

    def asleep(model: str) -> bool:
        return any(w["model"] == model and w["state"] == "sleeping" for w in stack.status()["workers"])

    # Held for a cold load; then a and b evict each other on GPU 0, sleeping and waking.
    chat("a")
    time.sleep(1.5)  # a scrape between two observations of the same series
    for model, other in (("b", "a"), ("a", "b"), ("b", "a"), ("a", "b")):
        chat(model)
        wait_for(lambda other=other: asleep(other), 30, f"{other} asleep")
        time.sleep(1.5)
    stack.unload("a")
    chat("a")  # cold again
    # A load that fails, twice; async jobs (batch lines' metrics).
    for _ in range(2):
        assert http("POST", stack.admin + "/load", {"model": "broken"}, timeout=120)[0] >= 500
        status, headers, _ = http(
            "POST", url, {"model": "npc", "messages": CHAT, "max_tokens": 2}, headers={"X-SSW-Async": "true"}
        )
        assert status == 202

        def done(location: str = headers["location"]) -> bool:
            return http("GET", stack.public + location)[2]["status"] == "succeeded"

        wait_for(done, 60, "the async job")
        time.sleep(1.5)


def test_every_dashboard_query_returns_data_from_a_real_prometheus(stack: Stack, prometheus: str) -> None:
    # Requests keep coming while Prometheus scrapes, so rates over the last minute have points.
    stop = threading.Event()

    def trickle() -> None:
        body = {"model": "npc", "messages": CHAT, "max_tokens": 2, "stream": True}
        while not stop.is_set():
            for priority in ("realtime", "interactive"):
                http("POST", stack.public + "/v1/chat/completions", body, headers={"X-SSW-Priority": priority})
            time.sleep(0.2)

    feeder = threading.Thread(target=trickle)
    feeder.start()
    try:
        work(stack)
        queries = dashboard_queries()
        assert len(queries) >= 20
        empty: list[tuple[str, str]] = []

        def all_have_data() -> bool:
            empty[:] = [(title, expr) for title, expr in queries if not has_data(prometheus, expr)]
            return not empty

        try:
            wait_for(all_have_data, 30, "every dashboard query to return data", interval=1.0)
        except AssertionError:
            raise AssertionError(f"queries with no data: {empty}") from None
    finally:
        stop.set()
        feeder.join(30)
    # The recording rules the alerts use evaluate on the real series too.
    assert has_data(prometheus, 'ssw:ttft_seconds:p95_5m{priority="realtime"}')
    assert has_data(prometheus, "ssw:threshold:realtime_ttft_p95_seconds")
