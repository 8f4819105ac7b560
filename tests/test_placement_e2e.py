"""Placement under pressure against real systemd, with the fake engine, on two
small simulated GPUs (10 GB each, no runtime overhead, so the numbers are
easy to follow): LRU eviction that spares pinned models, draining streams,
concurrent loads that never oversubscribe, failed-load cooldown, and facts
that survive a restart."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QWEN2_CONFIG, Stack, make_model_dir, start_stack, stop_stack
from tests.harness.stack import WORK_ROOT, http, http_in_background, wait_for
from tests.harness.sysbox import SysBox

pytestmark = pytest.mark.systemd
GB = 10**9
CHAT = [{"role": "user", "content": "hi"}]
WAIT = {"X-SSW-Wait": "true"}
STORM = 20


def models() -> dict[str, Any]:
    m: dict[str, Any] = {"pin": {"path": "m", "vram_gb": 4, "pinned": True, "gpus": [0]}}
    for name in ("m1", "m2", "m3", "m4", "m5", "s1", "s2"):
        m[name] = {"path": "m", "vram_gb": 4}
    m["s1"].update(gpus=[1], env={"SSW_FAKE_TPS": "10"})
    m["s2"]["gpus"] = [1]
    m["big"] = {"path": "m", "vram_gb": 8}
    m["huge"] = {"path": "m", "vram_gb": 30}
    m["bad"] = {"path": "m", "vram_gb": 4, "env": {"SSW_FAKE_FAIL": "exit-on-start"}}
    for i in range(STORM):
        m[f"c{i:02d}"] = {"path": "m", "vram_gb": 4, "env": {"SSW_FAKE_LOAD_DELAY": "0.5"}}
    return m


@pytest.fixture(scope="module")
def stack(sysbox: SysBox) -> Iterator[Stack]:
    models_dir = WORK_ROOT / f"placement-models-{id(sysbox)}"
    make_model_dir(models_dir / "m", QWEN2_CONFIG)
    extra = {
        "gpus": {"source": "simulated", "simulated": [{"memory_gb": 10}, {"memory_gb": 10}]},
        "placement": {"runtime_overhead_gb": 0, "failed_load_cooldown_s": 3, "restart_backoff_s": 0.5},
        "vllm": {"shutdown_timeout_s": 15},
    }
    s = start_stack(sysbox, WORK_ROOT / f"placement-{id(sysbox)}", models_dir, models(), "fake", extra)
    wait_for(lambda: workers(s).get("ssw-worker@pin.service", {}).get("state") == "ready", 30, "pinned model")
    yield s
    stop_stack(s)


def workers(stack: Stack) -> dict[str, dict[str, Any]]:
    return {w["unit"]: w for w in stack.status()["workers"]}


def chat(stack: Stack, model: str, **extra: Any) -> tuple[int, Any]:
    status, _, body = http(
        "POST",
        stack.public + "/v1/chat/completions",
        {"model": model, "messages": CHAT, "max_tokens": 2, **extra},
        headers=WAIT,
        timeout=60,
    )
    return status, body


def unload_all_but_pin(stack: Stack) -> None:
    for w in workers(stack).values():
        if w["model"] != "pin":
            http("POST", stack.admin + "/unload", {"model": w["model"]})


def test_lru_eviction_spares_pinned_models_and_serves_the_trigger(stack: Stack) -> None:
    for model in ("m1", "m2", "m3"):
        assert http("POST", stack.admin + "/load", {"model": model})[0] == 200
    ws = workers(stack)
    assert ws["ssw-worker@pin.service"]["gpus"] == [0]
    assert ws["ssw-worker@m1.service"]["gpus"] == [1]  # most free
    assert ws["ssw-worker@m2.service"]["gpus"] == [0]  # a tie goes to the lowest index
    assert ws["ssw-worker@m3.service"]["gpus"] == [1]
    # Use them in the order m3, m1, m2 (the pinned model is the oldest of all).
    for model in ("pin", "m3", "m1", "m2"):
        assert chat(stack, model)[0] == 200
        time.sleep(0.05)
    before = stack.status()["evictions_total"]

    # Both GPUs are full (2 GB free each): m4 must evict, and m3 is the least recently used.
    status, body = chat(stack, "m4")
    assert status == 200 and body["model"] == "m4"
    ws = workers(stack)
    assert "ssw-worker@m3.service" not in ws
    assert ws["ssw-worker@m4.service"]["gpus"] == [1]
    assert stack.box.systemctl("is-active", "ssw-worker@m3.service").stdout.strip() == "inactive"
    assert stack.status()["evictions_total"] == before + 1
    assert "ssw-worker@m3.service: ready -> draining (evicted to make room for m4" in stack.loader.log()

    # Next oldest is the pinned model on GPU 0, which stays; m1 goes.
    status, body = chat(stack, "m5")
    assert status == 200 and body["model"] == "m5"
    ws = workers(stack)
    assert "ssw-worker@m1.service" not in ws and "ssw-worker@pin.service" in ws
    assert stack.status()["evictions_total"] == before + 2
    unload_all_but_pin(stack)


def test_eviction_lets_a_stream_in_progress_finish(stack: Stack) -> None:
    for model in ("s1", "s2"):
        assert http("POST", stack.admin + "/load", {"model": model})[0] == 200
    assert {w["gpus"][0] for w in workers(stack).values() if w["model"] in ("s1", "s2")} == {1}
    # s1 generates 10 tokens per second: this stream takes 3 s.
    reader, result = http_in_background(
        "POST",
        stack.public + "/v1/chat/completions",
        {"model": "s1", "messages": CHAT, "max_tokens": 30, "stream": True},
        timeout=60,
    )
    time.sleep(0.5)
    # 'big' needs 8 GB: only GPU 1 can make room, by evicting both s1 and s2.
    status, body = chat(stack, "big")
    assert status == 200 and body["model"] == "big"
    reader.join(30)
    assert result["status"] == 200
    tokens = [line for line in result["body"].splitlines() if line.startswith("data: {")]
    assert len(tokens) == 31 and result["body"].rstrip().endswith("data: [DONE]")
    ws = workers(stack)
    assert "ssw-worker@s1.service" not in ws and "ssw-worker@s2.service" not in ws
    unload_all_but_pin(stack)


def test_concurrent_loads_never_oversubscribe_a_gpu(stack: Stack) -> None:
    totals = {g["index"]: g["memory_total_bytes"] for g in stack.status()["gpus"]}
    worst: dict[int, int] = {0: 0, 1: 0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            held: dict[int, int] = {0: 0, 1: 0}
            for w in stack.status()["workers"]:
                if w["unit_active"]:
                    for g in w["gpus"]:
                        held[g] += w["vram_budget_bytes"]
            for g in held:
                worst[g] = max(worst[g], held[g])
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(STORM) as pool:
        answers = list(
            pool.map(lambda i: http("POST", stack.admin + "/load", {"model": f"c{i:02d}"}, timeout=120), range(STORM))
        )
    done.set()
    watcher.join()
    codes = sorted(a[0] for a in answers)
    print(
        f"{STORM} concurrent loads: {codes.count(200)} loaded, {codes.count(503)} refused; "
        f"peak held per GPU {[worst[g] / GB for g in sorted(worst)]} GB"
    )
    assert set(codes) <= {200, 503}
    assert codes.count(200) >= 3  # at least the free room was used
    for a in answers:
        if a[0] == 503:
            assert a[2]["error"]["code"] in ("no_capacity", "load_failed")
    for g, total in totals.items():
        assert worst[g] <= total
    assert "a placement bug" not in stack.loader.log()
    unload_all_but_pin(stack)


def test_a_failed_load_releases_its_reservation_and_cools_down(stack: Stack) -> None:
    free_before = [g["memory_free_bytes"] for g in stack.status()["gpus"]]
    status, _, body = http("POST", stack.admin + "/load", {"model": "bad"})
    assert status == 503
    assert "failing on purpose" in body["error"]["message"]  # the journal's tail
    st = stack.status()
    assert [g["memory_free_bytes"] for g in st["gpus"]] == free_before
    assert all(g["memory_reserved_bytes"] == 0 for g in st["gpus"])
    assert st["models"]["bad"]["load"]["state"] == "cooling_down"
    assert st["models"]["bad"]["load"]["deadline"] > time.time()

    status, headers, body = http("POST", stack.admin + "/load", {"model": "bad"})
    assert status == 503 and "refused for" in body["error"]["message"]
    assert "failing on purpose" in body["error"]["message"]
    assert 1 <= int(headers["retry-after"]) <= 3
    # Through the gateway too, and no unit was started for it.
    status, headers, body = http("POST", stack.public + "/v1/chat/completions", {"model": "bad", "messages": CHAT})
    assert status == 503 and "refused for" in body["error"]["message"] and "retry-after" in headers
    assert stack.loader.log().count("ssw-worker@bad.service: starting (GPU") == 1

    time.sleep(3.2)
    assert http("POST", stack.admin + "/load", {"model": "bad"})[0] == 503
    assert stack.loader.log().count("ssw-worker@bad.service: starting (GPU") == 2


def test_a_model_too_big_for_any_gpu_is_refused_with_numbers(stack: Stack) -> None:
    status, _, body = http("POST", stack.admin + "/load", {"model": "huge"})
    assert status == 503 and body["error"]["code"] == "no_capacity"
    message = body["error"]["message"]
    assert "needs 30.0 GB on one GPU" in message and "at most 10.0 GB can be freed" in message


def test_measured_load_times_survive_a_loader_restart(stack: Stack) -> None:
    stack.load("m1")  # measured at least once

    def measured() -> dict[str, Any]:
        # Measuring follows readiness (it asks the ready worker which routes it mounted).
        facts: dict[str, Any] = json.loads(Path(stack.dir / "state" / "models.json").read_text())["models"]
        return facts.get("m1", {})

    wait_for(lambda: measured().get("load_seconds"), 30, "m1's load to be measured")
    assert all(t > 0 for t in measured()["load_seconds"])
    stack.loader.stop()
    stack.restart(stack.loader)
    entry = stack.status()["models"]["m1"]
    assert entry["load_seconds"] is not None and entry["load_seconds"] > 0
    assert workers(stack)["ssw-worker@pin.service"]["adopted"] is True


def test_a_pinned_worker_that_dies_is_restored(stack: Stack) -> None:
    unit = "ssw-worker@pin.service"
    pid = stack.unit_show(unit, "MainPID")["MainPID"]
    assert stack.box.systemctl("kill", "--signal=KILL", unit).returncode == 0

    def restored() -> bool:
        w = workers(stack).get(unit)
        new_pid = stack.unit_show(unit, "MainPID")["MainPID"]
        return w is not None and w["state"] == "ready" and new_pid not in (pid, "0")

    wait_for(restored, 30, "the pinned worker to come back")
    assert f"{unit}: ready -> failed (the unit went failed/failed unexpectedly" in stack.loader.log()
    assert "pinned model pin: worker died; restarting" in stack.loader.log()
    assert chat(stack, "pin")[0] == 200
