"""The worker lifecycle under churn, against real systemd with the fake engine:
requests held through a drain, a loader restarted during a drain or while
clients wait, pinned models that come back from start failures and hangs, a
canary that catches an engine that cannot generate, a backoff that traffic
cannot cut short, start failures that leave nothing behind, and failover
when a replica stops accepting connections.

Two simulated 10 GB GPUs without runtime overhead keep the numbers simple.
Each test loads what it needs and leaves the host as it found it.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QWEN2_CONFIG, Stack, make_model_dir, start_stack, stop_stack
from tests.harness.stack import WORK_ROOT, http, http_in_background, wait_for, worker_http
from tests.harness.sysbox import SysBox

pytestmark = pytest.mark.systemd
CHAT = [{"role": "user", "content": "hi"}]
WAIT = {"X-SSW-Wait": "true"}
BACKOFF_S = 3.0

MODELS: dict[str, Any] = {
    # 8 GB on GPU 1: a second worker of it fits only once the first is gone.
    "solo": {"path": "m", "vram_gb": 8, "gpus": [1], "env": {"SSW_FAKE_TPS": "10"}},
    "slowload": {"path": "m", "vram_gb": 1, "gpus": [0], "env": {"SSW_FAKE_LOAD_DELAY": "4"}},
    "pinme": {"path": "pinned-dir", "vram_gb": 1, "gpus": [0], "pinned": True},
    "crashy": {"path": "m", "vram_gb": 1, "gpus": [0]},
    "broken": {"path": "m", "vram_gb": 1, "env": {"SSW_FAKE_FAIL": "exit-on-start"}},
    "noexec": {"path": "m", "vram_gb": 1, "python": "/nonexistent/python3"},
    "pair": {"path": "m", "vram_gb": 1, "replicas": 2, "gpus": [0, 0], "env": {"SSW_FAKE_BACKLOG": "1"}},
}


@pytest.fixture(scope="module")
def stack(sysbox: SysBox) -> Iterator[Stack]:
    models_dir = WORK_ROOT / f"lifecycle-models-{id(sysbox)}"
    make_model_dir(models_dir / "m", QWEN2_CONFIG)
    make_model_dir(models_dir / "pinned-dir", QWEN2_CONFIG)
    extra = {
        "gpus": {"source": "simulated", "simulated": [{"memory_gb": 10}, {"memory_gb": 10}]},
        "placement": {
            "runtime_overhead_gb": 0,
            "failed_load_cooldown_s": 30,
            "restart_backoff_s": BACKOFF_S,
            "restart_backoff_max_s": BACKOFF_S,
        },
        "health": {
            "check_interval_s": 1.0,
            "probe_timeout_s": 1.0,
            "failures_to_replace": 2,
            "canary_interval_s": 1.0,
            "canary_timeout_s": 2.0,
        },
        "gateway": {"upstream_connect_timeout_s": 1.0, "wait_timeout_s": 60},
        "workers": {"drain_timeout_s": 20, "stop_timeout_s": 10},
        "vllm": {"shutdown_timeout_s": 10},
    }
    s = start_stack(sysbox, WORK_ROOT / f"lifecycle-{id(sysbox)}", models_dir, MODELS, "fake", extra)
    wait_for(lambda: workers(s, "pinme") and workers(s, "pinme")[0]["state"] == "ready", 30, "the pinned model")
    yield s
    stop_stack(s)


def workers(stack: Stack, model: str) -> list[dict[str, Any]]:
    return [w for w in stack.status()["workers"] if w["model"] == model]


def load_record(stack: Stack, model: str) -> dict[str, Any]:
    record: dict[str, Any] = stack.status()["models"][model]["load"]
    return record


def units_of(stack: Stack, model: str) -> list[str]:
    """The model's units systemd has loaded, in any state."""
    out = stack.box.systemctl("list-units", "--all", "--plain", "--no-legend", f"ssw-worker@{model}*").stdout
    return sorted(line.split()[0] for line in out.splitlines() if line.strip())


def chat(stack: Stack, model: str, headers: dict[str, str] | None = None, **extra: Any) -> tuple[int, Any]:
    status, _, body = http(
        "POST",
        stack.public + "/v1/chat/completions",
        {"model": model, "messages": CHAT, "max_tokens": 2, **extra},
        headers=WAIT if headers is None else headers,
        timeout=90,
    )
    return status, body


def long_stream(stack: Stack, model: str, tokens: int) -> tuple[threading.Thread, dict[str, Any]]:
    return http_in_background(
        "POST",
        stack.public + "/v1/chat/completions",
        {"model": model, "messages": CHAT, "max_tokens": tokens, "stream": True},
        timeout=90,
    )


def in_background(call: Any) -> threading.Thread:
    """A call whose outcome does not matter (its connection may die with the loader)."""

    def run() -> None:
        with contextlib.suppress(OSError):
            call()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def ready_one(stack: Stack, model: str) -> dict[str, Any]:
    def one() -> dict[str, Any] | None:
        ws = workers(stack, model)
        return ws[0] if len(ws) == 1 and ws[0]["state"] == "ready" else None

    worker: dict[str, Any] = wait_for(one, 30, f"{model} to be ready")
    return worker


def intact(result: dict[str, Any], tokens: int) -> bool:
    events = [line for line in result.get("body", "").splitlines() if line.startswith("data: {")]
    return result.get("status") == 200 and len(events) == tokens + 1 and result["body"].rstrip().endswith("[DONE]")


def test_a_request_during_a_drain_is_held_and_served_by_a_new_worker(stack: Stack) -> None:
    assert http("POST", stack.admin + "/load", {"model": "solo"})[0] == 200
    (old,) = workers(stack, "solo")
    reader, stream = long_stream(stack, "solo", 40)  # 4 s at 10 tokens/s
    time.sleep(0.5)
    unloading = in_background(lambda: http("POST", stack.admin + "/unload", {"model": "solo"}, timeout=60))
    wait_for(lambda: workers(stack, "solo") and workers(stack, "solo")[0]["state"] == "draining", 10, "the drain")
    asked = time.monotonic()
    status, body = chat(stack, "solo")
    served_after = time.monotonic() - asked
    print(f"held {served_after:.1f} s through the drain, then served by a new worker")
    assert status == 200 and body["model"] == "solo"
    reader.join(30)
    unloading.join(30)
    assert intact(stream, 40), stream  # the draining worker finished its stream
    (new,) = workers(stack, "solo")
    # A new unit: the name of the draining one was not reused while systemd had it.
    assert new["unit"] == "ssw-worker@solo:2.service" != old["unit"]
    assert new["state"] == "ready" and load_record(stack, "solo")["state"] == "idle"
    log = stack.loader.log()
    assert "UnitExists" not in log and "model solo: load loading -> cooling_down" not in log
    assert f"{old['unit']}: draining -> stopping (drained)" in log
    stack.unload("solo")
    wait_for(lambda: not units_of(stack, "solo"), 30, "its units to go")


def test_a_loader_restarted_during_a_drain_finishes_it(stack: Stack) -> None:
    assert http("POST", stack.admin + "/load", {"model": "solo"})[0] == 200
    (worker,) = workers(stack, "solo")
    reader, stream = long_stream(stack, "solo", 60)  # 6 s
    time.sleep(0.5)
    in_background(lambda: http("POST", stack.admin + "/unload", {"model": "solo"}, timeout=60))
    wait_for(lambda: workers(stack, "solo")[0]["state"] == "draining", 10, "the drain")
    # Killed once the drain is on disk (a few milliseconds after it shows as draining).
    retiring = stack.dir / "state" / "retiring.json"
    wait_for(lambda: retiring.exists() and worker["unit"] in retiring.read_text(), 10, "the drain to be recorded")
    stack.loader.kill(signal.SIGKILL)
    stack.restart(stack.loader)
    # The new loader knows the unit and that it was being taken down.
    (adopted,) = workers(stack, "solo")
    assert adopted["unit"] == worker["unit"] and adopted["adopted"] is True
    assert adopted["state"] == "draining" and "resumed after a loader restart" in adopted["state_reason"]
    reader.join(30)
    assert intact(stream, 60), stream
    wait_for(lambda: not units_of(stack, "solo"), 30, "the drained unit to stop")
    assert not workers(stack, "solo")


def test_loader_killed_while_twenty_clients_wait_every_one_is_served_by_one_unit(stack: Stack) -> None:
    results: list[tuple[int, Any]] = []
    threads = [threading.Thread(target=lambda: results.append(chat(stack, "slowload"))) for _ in range(20)]
    for t in threads:
        t.start()
    wait_for(lambda: workers(stack, "slowload"), 10, "the load to start")
    stack.loader.kill(signal.SIGKILL)
    killed = time.monotonic()
    stack.restart(stack.loader)
    for t in threads:
        t.join(60)
    print(f"20 waiters served {time.monotonic() - killed:.1f} s after the loader was killed")
    assert [status for status, _ in results] == [200] * 20
    assert time.monotonic() - killed < 30  # the wait timeout is 60 s
    assert units_of(stack, "slowload") == ["ssw-worker@slowload.service"]
    stack.unload("slowload")
    wait_for(lambda: not units_of(stack, "slowload"), 30, "its units to go")


def test_a_request_that_arrives_while_the_loader_is_down_waits_for_it(stack: Stack) -> None:
    stack.unload("solo")
    stack.loader.kill(signal.SIGKILL)
    try:
        # The gateway cannot ask for the load: it holds the request and asks again.
        thread, result = http_in_background(
            "POST",
            stack.public + "/v1/chat/completions",
            {"model": "solo", "messages": CHAT, "max_tokens": 2},
            timeout=60,
        )
        time.sleep(1.5)
        assert thread.is_alive()  # held, not refused
    finally:
        stack.restart(stack.loader)
    thread.join(60)
    assert result["status"] == 200 and result["body"]["model"] == "solo"


def test_a_pinned_model_comes_back_after_its_directory_was_unreadable(stack: Stack) -> None:
    model_dir = Path(stack.status()["models"]["pinme"]["path"])
    before = ready_one(stack, "pinme")
    # Earlier tests may have left failures inside the crash window: count this test's own.
    failures = load_record(stack, "pinme")["recent_failures"]
    model_dir.chmod(0o000)
    try:
        assert stack.box.systemctl("kill", "--signal=KILL", before["unit"]).returncode == 0
        # Its restarts fail (the worker cannot read its model) and are retried with backoff.
        wait_for(lambda: load_record(stack, "pinme")["recent_failures"] >= failures + 2, 30, "failed restarts")
        assert load_record(stack, "pinme")["state"] in ("backing_off", "loading")
        time.sleep(12)  # about 20 s unreadable in all
    finally:
        model_dir.chmod(0o755)
    restored = time.monotonic()
    wait_for(lambda: [w["state"] for w in workers(stack, "pinme")] == ["ready"], 30, "the pinned model to come back")
    print(f"pinned model back {time.monotonic() - restored:.1f} s after its directory was readable again")
    assert chat(stack, "pinme")[0] == 200
    assert load_record(stack, "pinme")["last_error"] is None


def test_a_worker_that_stops_answering_health_is_replaced(stack: Stack) -> None:
    before = ready_one(stack, "pinme")
    pid = stack.unit_show(before["unit"], "MainPID")["MainPID"]
    frozen = time.monotonic()
    assert stack.box.systemctl("kill", "--signal=STOP", before["unit"]).returncode == 0

    def replaced() -> bool:
        ws = workers(stack, "pinme")
        return (
            len(ws) == 1 and ws[0]["state"] == "ready" and stack.unit_show(ws[0]["unit"], "MainPID")["MainPID"] != pid
        )

    wait_for(replaced, 40, "the frozen worker to be replaced")
    print(f"frozen worker replaced in {time.monotonic() - frozen:.1f} s")
    log = stack.loader.log()
    assert f"{before['unit']}: ready -> unhealthy (/health did not answer 200 (1 of 2))" in log
    assert "replacing it: /health did not answer 200 in 2 checks in a row" in log
    assert chat(stack, "pinme")[0] == 200


def test_the_canary_catches_an_engine_that_answers_health_but_cannot_generate(stack: Stack) -> None:
    before = ready_one(stack, "pinme")
    assert worker_http(before["socket"], "POST", "/ssw-fake/break")[0] == 200
    assert worker_http(before["socket"], "GET", "/health")[0] == 200  # /health alone sees nothing wrong

    def replaced() -> bool:
        ws = workers(stack, "pinme")
        started = ws[0]["load_marks"].get("unit_started", 0) if ws else 0
        return len(ws) == 1 and ws[0]["state"] == "ready" and started > before["load_marks"]["unit_started"]

    wait_for(replaced, 40, "the broken engine to be replaced")
    assert "the 1-token canary failed: a 1-token completion answered 500" in stack.loader.log()
    assert chat(stack, "pinme")[0] == 200


def test_traffic_cannot_cut_a_restart_backoff_short(stack: Stack) -> None:
    stack.unload("crashy")
    starts_before = stack.loader.log().count("ssw-worker@crashy.service: starting (GPU")
    assert http("POST", stack.admin + "/load", {"model": "crashy"})[0] == 200
    (worker,) = workers(stack, "crashy")
    died = time.time()
    assert stack.box.systemctl("kill", "--signal=KILL", worker["unit"]).returncode == 0
    wait_for(lambda: load_record(stack, "crashy")["state"] == "backing_off", 10, "the backoff")
    deadline = load_record(stack, "crashy")["deadline"]
    # A request that will not wait gets a 503 whose Retry-After covers the backoff ...
    status, headers, body = http(
        "POST", stack.public + "/v1/chat/completions", {"model": "crashy", "messages": CHAT}, {"X-SSW-Wait": "false"}
    )
    assert status == 503 and body["error"]["code"] == "model_loading"
    assert int(headers["retry-after"]) >= deadline - time.time()
    # ... one that waits is held until the restart serves it ...
    assert chat(stack, "crashy")[0] == 200
    # ... and neither started a worker before the backoff was over.
    restarted = ready_one(stack, "crashy")["load_marks"]["unit_started"]
    print(f"restarted {restarted - died:.1f} s after the worker died (backoff {BACKOFF_S:.0f} s)")
    assert restarted >= died + BACKOFF_S - 0.1
    starts = stack.loader.log().count("ssw-worker@crashy.service: starting (GPU") - starts_before
    assert starts == 2  # its load and one restart
    stack.unload("crashy")
    wait_for(lambda: not units_of(stack, "crashy"), 30, "its units to go")


def test_loads_cancelled_at_once_leave_nothing_behind(stack: Stack) -> None:
    # Each unload cancels the load the request before it started, at any step of it.
    for _ in range(8):
        http("POST", stack.admin + "/unload", {"model": "crashy"}, timeout=60)
        status, _ = chat(stack, "crashy", headers={"X-SSW-Wait": "false"})
        assert status == 503
    unloaded_at = time.monotonic()
    http("POST", stack.admin + "/unload", {"model": "crashy"}, timeout=60)
    wait_for(lambda: not units_of(stack, "crashy") and not workers(stack, "crashy"), 20, "no unit left")
    # The unit name is free again and a worker under it loads and unloads at once.
    assert http("POST", stack.admin + "/load", {"model": "crashy"})[0] == 200
    assert [w["unit"] for w in workers(stack, "crashy")] == ["ssw-worker@crashy.service"]
    started = time.monotonic()
    assert http("POST", stack.admin + "/unload", {"model": "crashy"}, timeout=60)[0] == 200
    print(
        f"after 8 cancelled loads: clean in {started - unloaded_at:.1f} s, unload in {time.monotonic() - started:.1f} s"
    )
    assert time.monotonic() - started < 10 and not units_of(stack, "crashy")
    assert "stop failed" not in stack.loader.log()


@pytest.mark.parametrize(("model", "why"), [("broken", "failing on purpose"), ("noexec", "job failed")])
def test_a_failed_start_leaves_no_unit_and_no_worker(stack: Stack, model: str, why: str) -> None:
    status, _, body = http("POST", stack.admin + "/load", {"model": model}, timeout=60)
    assert status == 503 and why in body["error"]["message"]
    assert not workers(stack, model)
    assert units_of(stack, model) == []
    assert load_record(stack, model)["state"] == "cooling_down"
    # The directory made for its socket is gone too.
    assert not [d for d in (stack.dir / "sockets").iterdir() if d.name.startswith(f"{model}-")]


def test_a_replica_that_stopped_accepting_is_skipped_at_once(stack: Stack) -> None:
    assert http("POST", stack.admin + "/load", {"model": "pair"})[0] == 200
    first, second = workers(stack, "pair")
    assert stack.box.systemctl("kill", "--signal=STOP", second["unit"]).returncode == 0
    held = []
    try:
        # Its listen backlog (1) fills: further connections cannot even be made.
        for _ in range(3):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(second["socket"])
            held.append(s)
        answers = [chat(stack, "pair", headers={}) for _ in range(6)]
        assert [status for status, _ in answers] == [200] * 6
        assert {body["ssw_echo"]["socket"] for _, body in answers} == {first["socket"]}
        assert f"{second['unit']}: cannot connect to" in stack.gateway.log()
    finally:
        for s in held:
            s.close()
        stack.box.systemctl("kill", "--signal=CONT", second["unit"])
    stack.unload("pair")
    wait_for(lambda: not units_of(stack, "pair"), 30, "its units to go")
