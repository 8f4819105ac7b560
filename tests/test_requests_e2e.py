"""The request path under load and failure, against real systemd with the
fake engine: many waiters on one load, replicas that crash under steady
traffic, clients that disconnect, fallbacks, priorities, and a gateway that
is stopped with requests in flight."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Stack, start_stack, stop_stack
from tests.harness.stack import WORK_ROOT, http, http_in_background, wait_for, worker_http
from tests.harness.sysbox import SysBox

pytestmark = pytest.mark.systemd
CHAT = [{"role": "user", "content": "hi"}]
WAITERS = 500

MODELS = {
    "crowd": {"path": "fake-a", "vram_gb": 2, "env": {"SSW_FAKE_LOAD_DELAY": "2"}},
    # Loaded by one test only: before it, nothing is known of its load time.
    "honest": {"path": "fake-a", "vram_gb": 2, "env": {"SSW_FAKE_LOAD_DELAY": "2"}},
    "duo": {"path": "fake-a", "vram_gb": 2, "replicas": 2, "env": {"SSW_FAKE_TPS": "200"}},
    "slow": {"path": "fake-a", "vram_gb": 2, "env": {"SSW_FAKE_TPS": "10"}},
    "primary": {
        "path": "fake-b",
        "vram_gb": 2,
        "fallbacks": ["backup-alias"],
        "env": {"SSW_FAKE_FAIL": "exit-on-start"},
    },
    "backup": {"path": "fake-b", "vram_gb": 2, "aliases": ["backup-alias"]},
    "prio": {"path": "fake-a", "vram_gb": 2, "scheduling_policy": "priority"},
}


@pytest.fixture(scope="module")
def stack(sysbox: SysBox, models_root: Path) -> Iterator[Stack]:
    extra = {
        "placement": {"restart_backoff_s": 0.5},
        "gateway": {"max_waiters_per_model": WAITERS + 10, "not_loaded": "accept"},
    }
    s = start_stack(sysbox, WORK_ROOT / f"requests-{id(sysbox)}", models_root, MODELS, "fake", extra)
    yield s
    stop_stack(s)


def unit_starts(stack: Stack, model: str) -> int:
    return stack.loader.log().count(f"ssw-worker@{model}.service: starting (GPU")


def test_202_then_an_honest_retry_after_once_the_load_time_is_known(stack: Stack) -> None:
    url = stack.public + "/v1/chat/completions"
    status, headers, _ = http("POST", url, {"model": "honest", "messages": CHAT})
    assert status == 202 and headers["retry-after"] == "60"  # never loaded here: nothing is known
    wait_for(lambda: http("POST", url, {"model": "honest", "messages": CHAT})[0] == 200, 30, "honest to load")
    load_s = stack.status()["models"]["honest"]["load_seconds"]
    assert 2 <= load_s < 10
    http("POST", stack.admin + "/unload", {"model": "honest"})
    status, headers, _ = http("POST", url, {"model": "honest", "messages": CHAT})
    print(f"measured load {load_s:.1f} s; Retry-After {headers['retry-after']}")
    assert status == 202 and 1 <= int(headers["retry-after"]) <= round(load_s) + 1
    wait_for(lambda: stack.status()["models"]["honest"]["load"]["state"] == "idle", 30, "the load to finish")
    http("POST", stack.admin + "/unload", {"model": "honest"})


def test_many_waiters_one_load_all_served(stack: Stack) -> None:
    stack.unload("crowd")
    starts_before = unit_starts(stack, "crowd")

    async def run() -> list[tuple[int, str]]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def one(i: int) -> tuple[int, str]:
                async with session.post(
                    stack.public + "/v1/chat/completions",
                    json={"model": "crowd", "messages": CHAT, "max_tokens": 2},
                    headers={"X-SSW-Wait": "true"},
                    timeout=aiohttp.ClientTimeout(total=120),
                ) as resp:
                    body = await resp.json()
                    return resp.status, body.get("model", body)

            return await asyncio.gather(*(one(i) for i in range(WAITERS)))

    started = time.monotonic()
    results = asyncio.run(run())
    print(f"{WAITERS} waiters served in {time.monotonic() - started:.1f} s (2 s of it the load)")
    assert results == [(200, "crowd")] * WAITERS
    assert unit_starts(stack, "crowd") == starts_before + 1


def test_a_replica_killed_under_steady_load_loses_no_request(stack: Stack) -> None:
    assert http("POST", stack.admin + "/load", {"model": "duo"})[0] == 200
    stop = threading.Event()
    outcomes: list[int] = []

    def client() -> None:
        while not stop.is_set():
            status, _, _ = http(
                "POST",
                stack.public + "/v1/chat/completions",
                {"model": "duo", "messages": CHAT, "max_tokens": 4},
                timeout=30,
            )
            outcomes.append(status)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    before = len(outcomes)
    pid = stack.unit_show("ssw-worker@duo:2.service", "MainPID")["MainPID"]
    killed_at = time.monotonic()
    assert stack.box.systemctl("kill", "--signal=KILL", "ssw-worker@duo:2.service").returncode == 0

    def back() -> bool:
        w = {x["unit"]: x for x in stack.status()["workers"]}.get("ssw-worker@duo:2.service")
        new_pid = stack.unit_show("ssw-worker@duo:2.service", "MainPID")["MainPID"]
        return w is not None and w["state"] == "ready" and new_pid not in (pid, "0")

    wait_for(back, 30, "the killed replica to come back")
    restarted_in = time.monotonic() - killed_at
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    failed = [s for s in outcomes if s != 200]
    print(
        f"steady load: {len(outcomes)} requests ({before} before the kill), {len(failed)} failed; "
        f"replica back in {restarted_in:.1f} s"
    )
    assert not failed
    assert "model duo: worker died; restarting" in stack.loader.log()


def test_a_client_that_disconnects_mid_stream_aborts_the_upstream_request(stack: Stack) -> None:
    assert http("POST", stack.admin + "/load", {"model": "slow"})[0] == 200
    worker = next(w for w in stack.status()["workers"] if w["model"] == "slow")

    def stats() -> dict[str, int]:
        return worker_http(worker["socket"], "GET", "/ssw-fake/stats")[1]

    async def read_two_chunks_and_leave() -> None:
        async with aiohttp.ClientSession() as session:
            resp = await session.post(
                stack.public + "/v1/chat/completions",
                json={"model": "slow", "messages": CHAT, "max_tokens": 100, "stream": True},
            )
            await resp.content.readline()
            await resp.content.readline()
            resp.close()  # drop the connection mid-stream

    async def leave_before_the_first_byte() -> None:
        async with aiohttp.ClientSession() as session:
            resp = await session.post(
                stack.public + "/v1/chat/completions",
                json={"model": "slow", "messages": CHAT, "max_tokens": 100, "stream": True},
            )
            resp.close()

    asyncio.run(read_two_chunks_and_leave())
    wait_for(lambda: (stats()["running"], stats()["aborted"]) == (0, 1), 20, "the worker to see the abort")
    for _ in range(5):
        asyncio.run(leave_before_the_first_byte())
    # Nothing is left open in the gateway, whenever the client left.
    wait_for(lambda: http("GET", stack.public + "/health")[2]["requests_in_flight"] == 0, 20, "the gateway to let go")
    wait_for(lambda: stats()["running"] == 0, 20, "the worker to see every abort")


def test_fallback_serves_when_the_model_cannot_and_says_so(stack: Stack) -> None:
    assert http("POST", stack.admin + "/load", {"model": "backup"})[0] == 200
    url = stack.public + "/v1/chat/completions"
    status, _, body = http("POST", url, {"model": "primary", "messages": CHAT}, headers={"X-SSW-Wait": "true"})
    assert status == 503 and body["error"]["code"] == "load_failed"  # not asked for: no fallback
    status, headers, body = http(
        "POST", url, {"model": "primary", "messages": CHAT}, headers={"X-SSW-Wait": "true", "X-SSW-Fallback": "true"}
    )
    assert status == 200 and body["model"] == "backup"
    assert headers["x-ssw-fallback-from"] == "primary"


def test_priority_header_is_validated_and_passed_to_vllm(stack: Stack) -> None:
    url = stack.public + "/v1/chat/completions"
    status, _, body = http("POST", url, {"model": "prio", "messages": CHAT}, headers={"X-SSW-Priority": "urgent"})
    assert status == 400 and "X-SSW-Priority" in body["error"]["message"]
    assert http("POST", stack.admin + "/load", {"model": "prio"})[0] == 200
    props = stack.unit_show("ssw-worker@prio.service", "ExecStart")
    assert "--scheduling-policy priority" in props["ExecStart"]
    for tier, value in (("realtime", -10), ("batch", 10), (None, 0)):
        headers = {"X-SSW-Priority": tier} if tier else {}
        status, _, body = http("POST", url, {"model": "prio", "messages": CHAT}, headers=headers)
        assert status == 200 and body["ssw_echo"]["priority"] == value
    # A priority the client set itself wins.
    status, _, body = http("POST", url, {"model": "prio", "messages": CHAT, "priority": 3})
    assert body["ssw_echo"]["priority"] == 3


def test_gateway_sigterm_drains_in_flight_streams(stack: Stack) -> None:
    stack.load("slow")
    reader, result = http_in_background(
        "POST",
        stack.public + "/v1/chat/completions",
        {"model": "slow", "messages": CHAT, "max_tokens": 20, "stream": True},
        timeout=30,
    )
    time.sleep(0.5)
    try:
        assert stack.gateway.kill(signal.SIGTERM) == 0  # exits cleanly once the stream is done
    finally:
        reader.join(30)
        stack.restart(stack.gateway)
    assert result["status"] == 200 and result["body"].rstrip().endswith("data: [DONE]")
    assert stack.box.systemctl("is-active", "ssw-worker@slow.service").stdout.strip() == "active"
    assert (
        http("POST", stack.public + "/v1/chat/completions", {"model": "slow", "messages": CHAT, "max_tokens": 2})[0]
        == 200
    )
