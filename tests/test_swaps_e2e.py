"""Swaps that know who waits, and realtime kept fast, on real systemd with the fake
engine (paced like a GPU):

- with placement.drain_queue_before_swap, a model that clients keep busy serves
  that many more of their requests before it gives way to another model's load,
  so alternating demand is batched into fewer swaps;
- realtime requests go to the replica with the fewest requests in flight, even
  where the others are routed round-robin;
- with gateway.non_realtime_cap_per_worker, interactive requests on a worker that
  has realtime traffic are held in the gateway beyond the cap, so a realtime
  request finds a free slot in the engine's running batch instead of queueing
  behind a full one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.conftest import QWEN2_CONFIG, Stack, make_model_dir, start_stack, stop_stack
from tests.harness.stack import WORK_ROOT, http, wait_for, worker_http
from tests.harness.sysbox import SysBox

pytestmark = pytest.mark.systemd
CHAT = [{"role": "user", "content": "hi"}]
BOUND = 4
CAP = 1
MODELS = {
    # Two models that cannot share GPU 0; a request takes about 1 s.
    "turn-a": {"path": "m", "vram_gb": 6, "gpus": [0], "env": {"SSW_FAKE_TPS": "10"}},
    "turn-b": {"path": "m", "vram_gb": 6, "gpus": [0], "env": {"SSW_FAKE_TPS": "10"}},
    # A worker that runs two requests at once (vLLM's max_num_seqs), the rest queued by priority.
    "npc": {
        "path": "m",
        "vram_gb": 2,
        "gpus": [1],
        "scheduling_policy": "priority",
        "env": {"SSW_FAKE_TPS": "10", "SSW_FAKE_MAX_SEQS": "2"},
    },
    # Two replicas, routed round-robin (gateway.routing's default).
    "duo": {"path": "m", "vram_gb": 1, "gpus": [1], "replicas": 2, "env": {"SSW_FAKE_TPS": "10"}},
}


@pytest.fixture(scope="module")
def stack(sysbox: SysBox) -> Iterator[Stack]:
    models_dir = WORK_ROOT / f"swaps-models-{id(sysbox)}"
    make_model_dir(models_dir / "m", QWEN2_CONFIG)
    extra = {
        "gpus": {"source": "simulated", "simulated": [{"memory_gb": 10}, {"memory_gb": 10}]},
        "placement": {"runtime_overhead_gb": 0, "drain_queue_before_swap": BOUND, "swap_wait_s": 60},
        "gateway": {"non_realtime_cap_per_worker": CAP, "realtime_window_s": 600},
    }
    s = start_stack(sysbox, WORK_ROOT / f"swaps-{id(sysbox)}", models_dir, MODELS, "fake", extra)
    yield s
    stop_stack(s)


def chat(stack: Stack, model: str, tokens: int, priority: str = "interactive") -> tuple[int, Any]:
    body = {"model": model, "messages": CHAT, "max_tokens": tokens}
    status, _, answer = http(
        "POST", stack.public + "/v1/chat/completions", body, {"X-SSW-Priority": priority}, timeout=120
    )
    return status, answer


def test_a_busy_model_serves_its_queue_up_to_the_bound_before_it_gives_way(stack: Stack) -> None:
    stack.load("turn-a")
    answered: list[tuple[float, int]] = []  # (when, status) of each of turn-a's requests
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            status, _ = chat(stack, "turn-a", 10)
            answered.append((time.monotonic(), status))

    with ThreadPoolExecutor(3) as pool:
        clients = [pool.submit(client) for _ in range(3)]
        wait_for(lambda: len(answered) >= 3, 30, "turn-a's clients to be served")
        asked = time.monotonic()
        status, body = chat(stack, "turn-b", 2)  # held while turn-a serves its queue, then swapped in
        done = time.monotonic()
        stop.set()
        for c in clients:
            c.result(timeout=120)
    assert status == 200 and body["model"] == "turn-b", body
    between = [s for t, s in answered if asked < t < done]
    # turn-a went on answering its own clients (up to the bound) before the swap; with
    # the policy off it would have drained at once: at most its 3 requests in flight.
    assert between.count(200) >= BOUND, answered
    log = stack.loader.log()
    assert f"turn-b: ssw-worker@turn-a.service serves its queue first (up to {BOUND} more requests)" in log
    assert "ssw-worker@turn-a.service: ready -> draining (evicted to make room for turn-b" in log


def test_interactive_work_is_capped_on_a_worker_with_realtime_traffic_so_realtime_finds_a_slot(
    stack: Stack,
) -> None:
    stack.load("npc")
    assert chat(stack, "npc", 1, "realtime")[0] == 200  # the model now has realtime traffic
    worker = next(w for w in stack.status()["workers"] if w["model"] == "npc")
    with ThreadPoolExecutor(4) as pool:
        # Four long interactive requests (about 4 s each): the engine could run two at once.
        slow = [pool.submit(chat, stack, "npc", 40) for _ in range(4)]
        wait_for(lambda: running(worker["socket"]) >= CAP, 30, "the interactive requests to start")
        time.sleep(0.5)
        # The gateway holds what is over the cap: the engine runs and queues only CAP of them.
        assert running(worker["socket"]) + waiting(worker["socket"]) == CAP
        status, body = chat(stack, "npc", 2, "realtime")
        # It found the free slot: answered while every interactive request is still going
        # (without the cap both slots would be busy with 4-second requests).
        assert status == 200 and body["model"] == "npc", body
        assert not any(f.done() for f in slow)
        assert [f.result(timeout=120)[0] for f in slow] == [200] * 4


def test_realtime_requests_go_to_the_idle_replica_while_the_other_is_busy(stack: Stack) -> None:
    stack.load("duo")
    sockets = {w["unit"]: w["socket"] for w in stack.status()["workers"] if w["model"] == "duo"}
    assert len(sockets) == 2

    def generations() -> dict[str, int]:
        return {u: worker_http(s, "GET", "/ssw-fake/stats")[1]["generations"] for u, s in sockets.items()}

    before = generations()
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(chat, stack, "duo", 40)  # about 4 s on one replica
        wait_for(lambda: sum(running(s) for s in sockets.values()) == 1, 30, "the long request to start")
        busy = next(u for u, s in sockets.items() if running(s) == 1)
        for _ in range(4):  # round-robin would send every other one to the busy replica
            assert chat(stack, "duo", 1, "realtime")[0] == 200
        assert not long.done()
        assert long.result(timeout=60)[0] == 200
    served = {u: n - before[u] for u, n in generations().items()}
    idle = next(u for u in sockets if u != busy)
    assert served == {busy: 1, idle: 4}, served


def _metric(socket: str, name: str) -> float:
    status, text = worker_http(socket, "GET", "/metrics")
    assert status == 200
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def running(socket: str) -> float:
    return _metric(socket, "vllm:num_requests_running")


def waiting(socket: str) -> float:
    return _metric(socket, "vllm:num_requests_waiting")
