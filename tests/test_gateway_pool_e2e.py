"""Several gateway processes on one port (gateway.processes: 2), against real
systemd with the fake engine: connections land on both, each reloads the API
keys, waiters held in both are served by one load, metrics add up in the
parent, a process that dies is replaced, and exactly one process runs the
asynchronous tier's work, another taking over when it dies."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Stack, start_stack, stop_stack
from tests.harness.stack import WORK_ROOT, RedisServer, http, wait_for
from tests.harness.sysbox import SysBox

pytestmark = pytest.mark.systemd
CHAT = [{"role": "user", "content": "hi"}]
MODELS = {
    "alpha": {"path": "fake-a", "vram_gb": 2},
    "counted": {"path": "fake-a", "vram_gb": 2},  # only the metrics test sends to it
    "slowload": {"path": "fake-b", "vram_gb": 2, "env": {"SSW_FAKE_LOAD_DELAY": "2"}},
}


@pytest.fixture(scope="module")
def stack(sysbox: SysBox, models_root: Path, redis_server: RedisServer) -> Iterator[Stack]:
    extra = {"gateway": {"processes": 2}, "auth": {"enabled": True}}
    s = start_stack(
        sysbox, WORK_ROOT / f"pool-{id(sysbox)}", models_root, MODELS, "fake", extra, redis_url=redis_server.url
    )
    yield s
    stop_stack(s)


def children(stack: Stack) -> list[int]:
    assert stack.gateway.proc is not None
    out = subprocess.run(["pgrep", "-P", str(stack.gateway.proc.pid)], capture_output=True, text=True).stdout
    return sorted(int(pid) for pid in out.split())


def listeners(stack: Stack) -> int:
    """Sockets listening on the public port: one per process that serves (SO_REUSEPORT)."""
    port = stack.public.rsplit(":", 1)[1]
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
    return len(out.splitlines())


@pytest.fixture(autouse=True)
def both_serving(stack: Stack) -> None:
    """Each test starts with two processes serving, whatever the one before killed (a new
    process binds the port once it has started and follows the loader)."""
    wait_for(lambda: len(children(stack)) == 2 and listeners(stack) == 2, 30, "two gateway processes serving")


@pytest.fixture(scope="module")
def key(stack: Stack) -> str:
    added = stack.add_key("pool")
    assert stack.gateway.proc is not None
    stack.gateway.proc.send_signal(signal.SIGHUP)  # the parent passes it on to every process
    return added


def chat(stack: Stack, key: str, model: str = "alpha", wait: bool = False) -> int:
    headers = {"Authorization": f"Bearer {key}", "Connection": "close"}  # a new connection each time
    if wait:
        headers["X-SSW-Wait"] = "true"
    return http("POST", stack.public + "/v1/chat/completions", {"model": model, "messages": CHAT}, headers, timeout=60)[
        0
    ]


def requests_total(stack: Stack, **labels: str) -> float:
    text = http("GET", stack.gateway_metrics + "/metrics")[2]
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "ssw_requests"
        for sample in family.samples
        if sample.name == "ssw_requests_total" and labels.items() <= sample.labels.items()
    )


def test_two_processes_serve_and_every_one_reloads_the_keys(stack: Stack, key: str) -> None:
    assert len(children(stack)) == 2
    stack.load("counted")
    # 40 new connections: the kernel spreads them over both processes, and
    # every one of them knows the key added after they started.
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: chat(stack, key, "counted"), range(40)))
    assert statuses == [200] * 40
    assert chat(stack, "ssw-not-a-key", "counted") == 401
    # The parent's /metrics adds the processes up (within the accounting's flush interval).
    # (The 401 is counted before the body, so before any model, is read; no other test sends one.)
    counted = {"model": "counted", "status": "200"}
    wait_for(lambda: requests_total(stack, **counted) >= 40, 10, "the requests in the parent's metrics")
    wait_for(lambda: requests_total(stack, status="401") >= 1, 10, "the refusal in the parent's metrics")
    assert (requests_total(stack, **counted), requests_total(stack, status="401")) == (40, 1)
    # Both processes served: each keeps its own access log lines in the shared journal stream.
    log = stack.gateway.log()
    assert log.count("model=counted") >= 40


def test_waiters_held_in_both_processes_are_served_by_one_load(stack: Stack, key: str) -> None:
    stack.unload("slowload")
    with ThreadPoolExecutor(30) as pool:
        statuses = list(pool.map(lambda _: chat(stack, key, "slowload", wait=True), range(30)))
    assert statuses == [200] * 30
    assert stack.loader.log().count("ssw-worker@slowload.service: starting (GPU") == 1


def test_a_gateway_process_that_dies_is_replaced(stack: Stack, key: str) -> None:
    stack.load("alpha")
    first, second = children(stack)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: len(children(stack)) == 2 and first not in children(stack), 20, "a new gateway process")
    assert second in children(stack)
    # A new process binds the port only once it follows the loader: then it serves at once.
    wait_for(lambda: listeners(stack) == 2, 30, "the new process to serve")
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda _: chat(stack, key), range(20))) == [200] * 20
    assert "exited with -9; starting another" in stack.gateway.log()


def async_jobs(stack: Stack, key: str, n: int) -> None:
    """n async requests, each on a new connection (so both processes take some), all run."""
    body = {"model": "alpha", "messages": CHAT, "max_tokens": 2}
    headers = {"Authorization": f"Bearer {key}", "Connection": "close", "X-SSW-Async": "true"}
    accepted = [http("POST", stack.public + "/v1/chat/completions", body, headers) for _ in range(n)]
    assert all(status == 202 for status, _, _ in accepted), accepted

    def all_done() -> bool:
        views = [
            http("GET", stack.public + h["location"], headers={"Authorization": f"Bearer {key}"})[2]
            for _, h, _ in accepted
        ]
        return all(v["status"] == "succeeded" for v in views)

    wait_for(all_done, 60, "the async jobs")


def test_one_process_runs_the_async_work_and_another_takes_over(
    stack: Stack, key: str, redis_server: RedisServer
) -> None:
    stack.load("alpha")
    async_jobs(stack, key, 10)
    redis = redis_server.client(decode_responses=True)
    holder = redis.get("ssw:batch:runner")
    assert holder is not None
    pid = int(holder.rsplit("-", 2)[1])
    assert pid in children(stack)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: len(children(stack)) == 2 and pid not in children(stack), 20, "a new gateway process")
    wait_for(lambda: listeners(stack) == 2, 30, "the new process to serve")
    # The other process (or the one started in its place) takes over at once: the
    # holder's process is gone, on this host.
    async_jobs(stack, key, 4)
    after = redis.get("ssw:batch:runner")
    assert after is not None and int(after.rsplit("-", 2)[1]) in children(stack) and after != holder
