"""The warm tier on real systemd, with the fake engine's sleep API: evicted and
idle workers sleep instead of stopping and wake for the next request; sleeps
wait for in-flight requests; GPU memory is seen free before anything is placed
there; sleepers stay within their host memory budget; a wake that fails, or
whose known answer differs, loads the model cold; preload.

One simulated 10 GB GPU holds one of the 6 GB models at a time, so loading one
evicts the other. GPU 1 holds the preloaded model.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.conftest import QWEN2_CONFIG, Stack, make_model_dir, start_stack, stop_stack
from tests.harness.stack import REPO, SSW_VENV, WORK_ROOT, RedisServer, http, http_in_background, wait_for, worker_http
from tests.harness.sysbox import SysBox

pytestmark = pytest.mark.systemd
CHAT = [{"role": "user", "content": "hi"}]
WAIT = {"X-SSW-Wait": "true"}
# What each sleeper at level 1 holds in host RAM (resident): one sleeper fits the
# 0.3 GB budget beside its process, two do not.
WEIGHTS_MB = 150


def models() -> dict[str, Any]:
    def sleeper(**env: str) -> dict[str, Any]:
        return {
            "path": "m",
            "vram_gb": 6,
            "gpus": [0],
            "sleep": True,
            # Cold starts (2 s) slower than wakes (0.5 s), as with vLLM: level 1 pays.
            "env": {"SSW_FAKE_WEIGHTS_MB": str(WEIGHTS_MB), "SSW_FAKE_TPS": "40", "SSW_FAKE_LOAD_DELAY": "2", **env},
        }

    return {
        "a": sleeper(),
        # 2 GB of weights (sparse files): more than the 0.3 GB the sleepers may hold, so level 2.
        "heavy": {**sleeper(), "path": "mbig"},
        "b": sleeper(),
        "c": sleeper(),
        "leaky": sleeper(SSW_FAKE_SLEEP_LEAK="1"),
        "liar": sleeper(),  # answers wrongly after a wake, when a test asks it to
        "cold": {"path": "m", "vram_gb": 6, "gpus": [0]},  # sleep: auto, off on simulated GPUs
        "nap": {**sleeper(), "idle_ttl_s": 2},
        "quit": {"path": "m", "vram_gb": 2, "gpus": [1], "idle_ttl_s": 2},
        "pre": {"path": "m", "vram_gb": 2, "gpus": [1], "preload": True},
        # Pinned: never sleeps unless models.yaml says so.
        # (no fake weights: it sleeps through the module, beside the RAM budget's tests)
        "pinnap": {**sleeper(SSW_FAKE_WEIGHTS_MB="0"), "vram_gb": 1, "gpus": [1], "pinned": True, "idle_ttl_s": 2},
        "pinwake": {"path": "m", "vram_gb": 1, "gpus": [1], "pinned": True, "idle_ttl_s": 2},
        # Prewarmed from the request records seeded in Redis before the loader starts.
        "hot": {"path": "m", "vram_gb": 2, "gpus": [1]},
        "warm": {"path": "m", "vram_gb": 2, "gpus": [1]},
        "hugehot": {"path": "m", "vram_gb": 9, "gpus": [1]},  # most requested, but no room without evicting
        "failing": {"path": "m", "vram_gb": 1, "gpus": [1]},  # requested, never served
    }


SEEDED = {"hugehot": (9, 200), "hot": (5, 200), "warm": (2, 200), "failing": (4, 503)}


def seed_request_records(url: str) -> None:
    client = redis.Redis.from_url(url)
    now = time.time()
    # Older than prewarm_hours: does not count (stream IDs are times, and increase).
    client.xadd("ssw:requests", {"r": json.dumps({"model": "c", "status": 200})}, id=f"{int((now - 7200) * 1000)}-0")
    for model, (n, status) in SEEDED.items():
        for i in range(n):
            record = {"ts": now - 600 - i, "model": model, "status": status, "error": "" if status < 400 else "x"}
            client.xadd("ssw:requests", {"r": json.dumps(record)})
    client.close()


@pytest.fixture(scope="module")
def stack(sysbox: SysBox, redis_server: RedisServer) -> Iterator[Stack]:
    models_dir = WORK_ROOT / f"sleep-models-{id(sysbox)}"
    make_model_dir(models_dir / "m", QWEN2_CONFIG)
    make_model_dir(models_dir / "mbig", QWEN2_CONFIG, weight_bytes=2 * 10**9)
    seed_request_records(redis_server.url)
    extra = {
        "gpus": {"source": "simulated", "simulated": [{"memory_gb": 10}, {"memory_gb": 10}]},
        "placement": {"runtime_overhead_gb": 0, "sleep_ram_gb": 0.3, "prewarm_hours": 1},
        "workers": {"freed_timeout_s": 2, "sleep_residual_gb": 0.5},
        "vllm": {"shutdown_timeout_s": 5},
    }
    s = start_stack(sysbox, WORK_ROOT / f"sleep-{id(sysbox)}", models_dir, models(), "fake", extra, redis_server.url)
    yield s
    stop_stack(s)


@pytest.fixture(autouse=True)
def nothing_on_gpu_0(stack: Stack) -> None:
    """Each test starts with no worker, awake or asleep, on GPU 0."""
    for model in {w["model"] for w in stack.status()["workers"] if 0 in w["gpus"]}:
        stack.unload(model)


def workers(stack: Stack, model: str) -> list[dict[str, Any]]:
    return [w for w in stack.status()["workers"] if w["model"] == model]


def state_of(stack: Stack, model: str) -> str | None:
    ws = workers(stack, model)
    return ws[0]["state"] if len(ws) == 1 else None


def chat(stack: Stack, model: str, **extra: Any) -> tuple[int, dict[str, str], Any]:
    return http(
        "POST",
        stack.public + "/v1/chat/completions",
        {"model": model, "messages": CHAT, "max_tokens": 2, **extra},
        headers=WAIT,
        timeout=60,
    )


def main_pid(stack: Stack, unit: str) -> str:
    return stack.unit_show(unit, "MainPID")["MainPID"]


def asleep(stack: Stack, model: str) -> dict[str, Any]:
    wait_for(lambda: state_of(stack, model) == "sleeping", 30, f"{model} to sleep")
    return workers(stack, model)[0]


def test_an_evicted_model_sleeps_and_wakes_for_its_next_request(stack: Stack) -> None:
    a = stack.load("a")["workers"][0]
    pid = main_pid(stack, a["unit"])
    assert chat(stack, "b")[0] == 200  # b needs a's GPU memory
    slept = asleep(stack, "a")
    assert slept["unit"] == a["unit"] and slept["sleep_level"] == 1
    assert main_pid(stack, a["unit"]) == pid  # the same process, kept
    assert "asleep at level 1" in slept["state_reason"] and "GB of GPU memory freed" in slept["state_reason"]
    # Visible everywhere: systemctl, the gateway's model list, Prometheus.
    assert "asleep (level 1)" in stack.unit_show(a["unit"], "Description")["Description"]
    listed = {m["id"]: m for m in http("GET", stack.public + "/v1/models")[2]["data"]}
    assert listed["a"]["ssw"]["state"] == "sleeping"
    metrics = http("GET", stack.admin + "/metrics")[2]
    sleeping = sum(w["state"] == "sleeping" for w in stack.status()["workers"])  # a, and pinnap by now or not
    assert sleeping >= 1 and f'ssw_workers{{state="sleeping"}} {sleeping:.1f}' in metrics
    assert worker_http(a["socket"], "GET", "/is_sleeping")[1] == {"is_sleeping": True}
    cli = stack.cli("status")
    assert cli.returncode == 0 and f"{a['unit']}: sleeping on GPU 0" in cli.stdout
    assert "asleep at level 1" in cli.stdout
    # Its host memory is read from its cgroup: the weights it keeps, resident.
    wait_for(lambda: (workers(stack, "a")[0]["ram_bytes"] or 0) > WEIGHTS_MB * 2**20, 10, "its MemoryCurrent")

    started = time.monotonic()
    status, _, body = chat(stack, "a")
    took = time.monotonic() - started
    assert status == 200 and body["model"] == "a"
    print(f"request to a sleeping model answered in {took:.2f} s (the fake engine wakes in 0.5 s)")
    woke = workers(stack, "a")[0]
    assert woke["unit"] == a["unit"] and woke["state"] == "ready" and main_pid(stack, a["unit"]) == pid
    assert "awake after" in woke["state_reason"] and "canary passed" in woke["state_reason"]
    assert asleep(stack, "b")["sleep_level"] == 1  # and b gave way in turn
    assert stack.status()["models"]["a"]["wake_seconds"] > 0
    log = stack.loader.log()
    assert f"{a['unit']}: draining -> sleeping" in log and f"{a['unit']}: waking -> ready" in log
    assert "to sleep at level 1: its weights" in log
    # Evicted again after its wake: the next start waits for this sleep, not the last one.
    assert chat(stack, "c")[0] == 200
    assert asleep(stack, "a")["unit"] == a["unit"]
    assert "a placement bug" not in stack.loader.log()


def test_a_sleep_waits_for_the_streams_in_flight(stack: Stack) -> None:
    a = stack.load("a")["workers"][0]
    streams = [
        http_in_background(
            "POST",
            stack.public + "/v1/chat/completions",
            {"model": "a", "messages": CHAT, "max_tokens": 60, "stream": True},
            timeout=60,
        )
        for _ in range(3)
    ]
    wait_for(lambda: worker_http(a["socket"], "GET", "/ssw-fake/stats")[1]["running"] == 3, 10, "3 streams")
    assert chat(stack, "b")[0] == 200  # evicts a while its streams run (1.5 s each)
    for thread, _ in streams:
        thread.join(30)
    for _, result in streams:
        events = [line for line in result["body"].splitlines() if line.startswith("data: {")]
        assert result["status"] == 200 and len(events) == 61 and result["body"].rstrip().endswith("[DONE]")
    asleep(stack, "a")
    # The engine was asked to sleep once, with nothing in flight.
    assert worker_http(a["socket"], "GET", "/ssw-fake/sleeps")[1]["in_flight_at_sleep"] == [0]


def test_a_sleep_that_frees_no_gpu_memory_stops_the_worker_before_anything_is_placed(stack: Stack) -> None:
    leaky = stack.load("leaky")["workers"][0]
    assert chat(stack, "b")[0] == 200
    assert not workers(stack, "leaky")  # stopped, not asleep
    assert stack.unit_show(leaky["unit"], "ActiveState")["ActiveState"] in ("inactive", "")
    log = stack.loader.log()
    assert f"{leaky['unit']}: not put to sleep (its GPU memory did not come free within 2 s" in log
    assert "6.00 GB still held of 6.00 GB" in log
    # b's worker started only once leaky's memory was really free.
    b = workers(stack, "b")[0]
    assert b["load_phases_s"]["eviction"] >= 2.0


def test_sleepers_beyond_the_host_memory_budget_are_stopped_least_recently_used_first(stack: Stack) -> None:
    stack.load("a")
    stack.load("b")  # a sleeps
    assert asleep(stack, "a")["sleep_level"] == 1
    stack.load("c")  # b sleeps; a and b hold more host memory than the 0.3 GB budget
    asleep(stack, "b")
    ram = {w["model"]: (w["state"], w["ram_bytes"]) for w in stack.status()["workers"]}
    print(f"sleepers' host memory: {ram}")
    wait_for(lambda: not workers(stack, "a"), 30, f"the least recently used sleeper to stop ({ram})")
    assert state_of(stack, "b") == "sleeping"
    assert "(placement.sleep_ram_gb); least recently used" in stack.loader.log()


def test_a_failed_wake_or_canary_stops_the_worker_and_loads_the_model_cold(stack: Stack) -> None:
    faults = (
        ("/ssw-fake/fail-wake", "wake failed: /wake_up answered 500"),
        ("/ssw-fake/break-on-wake", "the 1-token canary after the wake failed"),
    )
    for fault, reason in faults:
        a = stack.load("a")["workers"][0]
        pid = main_pid(stack, a["unit"])
        stack.load("b")
        asleep(stack, "a")
        assert worker_http(a["socket"], "POST", fault)[0] == 200
        status, _, body = chat(stack, "a")
        assert status == 200 and body["model"] == "a", body
        now = workers(stack, "a")[0]
        assert now["state"] == "ready" and main_pid(stack, now["unit"]) != pid  # a fresh process
        assert reason in stack.loader.log()
        stack.unload("b")


def test_a_worker_that_answers_wrongly_after_a_wake_is_replaced_cold_and_its_model_sleeps_no_more(
    stack: Stack,
) -> None:
    liar = stack.load("liar")["workers"][0]
    wait_for(lambda: stack.status()["models"]["liar"]["known_answer"]["recorded"], 30, "liar's answer recorded")
    pid = main_pid(stack, liar["unit"])
    stack.load("b")
    asleep(stack, "liar")
    assert worker_http(liar["socket"], "POST", "/ssw-fake/garble-on-wake")[0] == 200
    status, _, body = chat(stack, "liar")
    assert status == 200 and body["model"] == "liar", body
    now = workers(stack, "liar")[0]
    assert now["state"] == "ready" and main_pid(stack, now["unit"]) != pid  # a fresh process, loaded cold
    assert "the known answer after the wake differs: 'x0 x1 x2 x3' where 't0 t1 t2 t3' was recorded" in (
        stack.loader.log()
    )
    checked = stack.status()["models"]["liar"]["known_answer"]
    assert checked["failures"] == 1 and "differs" in (checked["sleep_blocked"] or "")
    assert "--enable-sleep-mode" not in stack.unit_show(now["unit"], "ExecStart")["ExecStart"]
    metrics = http("GET", stack.admin + "/metrics")[2]
    assert 'ssw_known_answer_failures_total{after="wake",model="liar"} 1.0' in metrics
    # Evicted now, it stops rather than sleep; an operator's all-clear lets it sleep again.
    stack.load("b")
    wait_for(lambda: not workers(stack, "liar"), 30, "liar to stop, not sleep")
    cleared = stack.cli("clear-check", "liar")
    assert cleared.returncode == 0 and "liar: cleared" in cleared.stdout, cleared.stderr
    assert stack.status()["models"]["liar"]["known_answer"] == {
        "recorded": False,
        "failures": 1,
        "last_failure": None,
        "sleep_blocked": None,
    }
    stack.unload("b")


def test_a_model_without_sleep_mode_is_stopped_when_evicted(stack: Stack) -> None:
    cold = stack.load("cold")["workers"][0]
    assert "--enable-sleep-mode" not in stack.unit_show(cold["unit"], "ExecStart")["ExecStart"]
    assert chat(stack, "a")[0] == 200
    wait_for(lambda: not workers(stack, "cold"), 30, "cold to stop")
    assert "to stop: sleep mode is off for this model" in stack.loader.log()


def test_idle_workers_sleep_or_stop_after_their_ttl(stack: Stack) -> None:
    nap = stack.load("nap")["workers"][0]
    assert "--enable-sleep-mode" in stack.unit_show(nap["unit"], "ExecStart")["ExecStart"]
    stack.load("quit")
    slept = asleep(stack, "nap")
    assert "idle_ttl_s 2" in stack.loader.log()
    assert slept["unit"] == nap["unit"]
    wait_for(lambda: not workers(stack, "quit"), 30, "the model without sleep mode to stop when idle")
    assert chat(stack, "nap")[0] == 200 and state_of(stack, "nap") == "ready"


def test_a_preloaded_model_is_up_after_start_and_may_be_evicted(stack: Stack) -> None:
    # Loaded by the loader at start, with no request; not pinned.
    wait_for(lambda: state_of(stack, "pre") == "ready", 30, "the preloaded model")
    assert stack.status()["models"]["pre"]["pinned"] is False
    assert "model pre: load idle -> loading (preload: loaded at start)" in stack.loader.log()


def test_waiters_for_a_sleeping_model_are_all_served_by_one_wake(stack: Stack) -> None:
    a = stack.load("a")["workers"][0]
    stack.load("b")
    asleep(stack, "a")
    wakes_before = stack.loader.log().count(f"{a['unit']}: sleeping -> waking")
    results: list[int] = []

    def one() -> None:
        results.append(chat(stack, "a")[0])

    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200] * 10
    assert stack.loader.log().count(f"{a['unit']}: sleeping -> waking") == wakes_before + 1
    assert workers(stack, "a")[0]["unit"] == a["unit"]  # woken, never started twice


def test_the_models_most_requested_lately_are_prewarmed_where_free_memory_holds_them(stack: Stack) -> None:
    wait_for(lambda: state_of(stack, "hot") == "ready" and state_of(stack, "warm") == "ready", 30, "prewarm")
    log = stack.loader.log()
    assert "model hot: load idle -> loading (prewarm: 5 requests served in the last 1 h)" in log
    assert "model warm: load idle -> loading (prewarm: 2 requests served in the last 1 h)" in log
    # Most requested, but GPU 1 has no room for it without evicting: left alone.
    assert "prewarm: hugehot not loaded: hugehot: needs 9.0 GB on one GPU" in log
    assert not workers(stack, "hugehot") and not workers(stack, "failing")  # errors only: not prewarmed
    assert state_of(stack, "pre") == "ready" and "to make room for hugehot" not in log
    assert "model c: load idle -> loading (prewarm" not in log  # its requests are older than the window


def test_a_restarted_loader_adopts_a_sleeper_as_asleep_and_wakes_it(stack: Stack) -> None:
    a = stack.load("a")["workers"][0]
    pid = main_pid(stack, a["unit"])
    stack.load("b")
    asleep(stack, "a")
    stack.loader.stop()
    stack.restart(stack.loader)
    adopted = workers(stack, "a")[0]
    assert adopted["state"] == "sleeping" and adopted["adopted"] and adopted["state_reason"] == "adopted asleep"
    status, _, body = chat(stack, "a")
    assert status == 200 and body["model"] == "a"
    assert workers(stack, "a")[0]["state"] == "ready" and main_pid(stack, a["unit"]) == pid


def test_weights_too_big_for_the_host_memory_budget_sleep_at_level_2(stack: Stack) -> None:
    heavy = stack.load("heavy")["workers"][0]
    assert chat(stack, "b")[0] == 200
    slept = asleep(stack, "heavy")
    assert slept["sleep_level"] == 2 and slept["unit"] == heavy["unit"]
    assert "to sleep at level 2: level 1 needs 2.0 GB of host memory, the budget is 0.3 GB" in stack.loader.log()
    assert worker_http(heavy["socket"], "GET", "/ssw-fake/sleeps")[1]["level"] == 2
    ram = wait_for(lambda: workers(stack, "heavy")[0]["ram_bytes"], 10, "its MemoryCurrent")
    assert ram < WEIGHTS_MB * 2**20  # the weights were dropped, not kept in host memory
    status, _, body = chat(stack, "heavy")
    assert status == 200 and body["model"] == "heavy"
    assert "from sleep level 2" in workers(stack, "heavy")[0]["state_reason"]


def test_cold_starts_are_timed_per_set_of_start_options_and_kept(stack: Stack) -> None:
    out = stack.dir / "coldstart.json"
    seen: dict[str, str] = {}

    def watch() -> None:  # the trial's command line while its worker starts (2 s)
        def up() -> bool:
            seen.update(stack.unit_show("ssw-worker@a.service", "ExecStart"))
            return "--enforce-eager" in seen.get("ExecStart", "")

        wait_for(up, 30, "the trial's worker")

    watcher = threading.Thread(target=watch)
    watcher.start()
    result = subprocess.run(
        [
            str(SSW_VENV / "bin/python"),
            str(REPO / "bench/coldstart.py"),
            "--admin",
            stack.admin,
            "--admin-token-file",
            str(stack.dir / "admin.token"),
            "--model",
            "a",
            "--try",
            '{"enforce_eager": true}',
            "--try",
            "{}",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    watcher.join(30)
    assert result.returncode == 0, result.stderr
    assert "--enforce-eager" in seen["ExecStart"]
    report = json.loads(out.read_text())
    assert set(report["median_s"]) == {'{"enforce_eager":true}', "{}"}
    assert all(s >= 2.0 for s in report["median_s"].values())  # the fake engine's 2 s load delay
    assert not workers(stack, "a")  # each trial's worker is stopped
    status = stack.status()["models"]["a"]
    assert set(status["cold_starts"]) == {'{"enforce_eager":true}', "{}"} and status["cold_start_best"]
    # A loaded model is refused, and options are checked as models.yaml's are.
    stack.load("a")
    busy = http("POST", stack.admin + "/coldstart", {"model": "a"})
    assert busy[0] == 409 and busy[2]["error"]["code"] == "model_busy"
    bad = http("POST", stack.admin + "/coldstart", {"model": "b", "options": {"load_format": "x; rm -rf /"}})
    assert bad[0] == 422 and "load_format" in bad[2]["error"]["message"]
    assert http("POST", stack.admin + "/coldstart", {"model": "b", "options": {"gpus": [1]}})[0] == 422


def test_pinned_models_sleep_on_idle_only_when_told_to(stack: Stack) -> None:
    wait_for(lambda: state_of(stack, "pinnap") == "sleeping", 30, "the pinned model with sleep: true to sleep")
    assert state_of(stack, "pinwake") == "ready"  # sleep: auto is off for pinned models, and it is never stopped
    assert "--enable-sleep-mode" not in stack.unit_show("ssw-worker@pinwake.service", "ExecStart")["ExecStart"]
    status, _, body = chat(stack, "pinnap")
    assert status == 200 and body["model"] == "pinnap"
