"""A fleet of two hosts on one shared Redis, each a disposable systemd host in
its own network namespace with the production ports: a model ready on host B
is served through host A's gateway; 50 clients over both gateways asking for
a model loaded nowhere start exactly one unit fleet-wide; host B dies and its
models are loaded and served on A within the TTL, as are those of a host cut
off the network; a load placed on a host that dies is placed again; with the
fleet's Redis down each host serves its own models, and the fleet comes back
when it does."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.harness.fleet import FleetHost, Network
from tests.harness.stack import WORK_ROOT, RedisServer, http, wait_for

pytestmark = pytest.mark.systemd
CHAT = [{"role": "user", "content": "hi"}]
TTL_S = 5.0
MODELS = {
    "shared": {"path": "fake-a", "vram_gb": 2},
    "burst": {"path": "fake-b", "vram_gb": 2, "env": {"SSW_FAKE_LOAD_DELAY": "1"}},
    "solo": {"path": "fake-a", "vram_gb": 2},
    "local": {"path": "fake-b", "vram_gb": 2},
    "slowload": {"path": "fake-b", "vram_gb": 2, "env": {"SSW_FAKE_LOAD_DELAY": "8"}},
}


@pytest.fixture(scope="module")
def fleet(models_root: Path) -> Iterator[tuple[Network, RedisServer, FleetHost, FleetHost]]:
    root = WORK_ROOT / f"fleet-{secrets.token_hex(3)}"
    root.mkdir(parents=True)
    net = Network().up()
    redis = RedisServer(root / "redis", host=net.gateway_ip, password=secrets.token_hex(8)).start()
    token = root / "fleet.token"
    token.write_text(secrets.token_urlsafe(32))
    settings = {
        "redis_url": redis.url,
        "credential_file": str(token),
        "heartbeat_s": 0.5,
        "ttl_s": TTL_S,
        "load_lease_s": 30,
    }
    hosts: list[FleetHost] = []
    try:
        for index in (1, 2):
            hosts.append(FleetHost.start(net, index, root, models_root, MODELS, settings))
        a, b = hosts
        wait_for(lambda: all(len(fleet_hosts(h)) == 2 for h in hosts), 30, "both hosts to see each other")
        yield net, redis, a, b
    finally:
        for host in hosts:
            host.stop()
        redis.stop()
        net.down()
    for host in hosts:
        for role in (host.loader, host.gateway):
            assert "Traceback" not in role.log(), role.log()


def fleet_hosts(host: FleetHost) -> list[str]:
    fleet = host.health().get("fleet") or {}
    return list(fleet.get("hosts", [])) if fleet.get("connected") else []


def chat(host: FleetHost, model: str, **kw: Any) -> tuple[int, dict[str, str], Any]:
    body = {"model": model, "messages": CHAT, "max_tokens": 3, **kw}
    return http("POST", host.public + "/v1/chat/completions", body, headers={"X-SSW-Wait": "true"}, timeout=120)


def unload(*hosts: FleetHost, model: str) -> None:
    for host in hosts:
        host.admin("POST", "/unload", {"model": model})
    wait_for(lambda: not any(h.workers(model) for h in hosts), 60, f"{model} unloaded everywhere")


def ready_on(host: FleetHost, model: str) -> bool:
    return any(w["state"] == "ready" for w in host.workers(model))


def seen_ready(viewer: FleetHost, model: str, where: str, state: str = "ready") -> bool:
    status, _, models = http("GET", viewer.public + "/v1/models")
    entry = next((m for m in models["data"] if m["id"] == model), None) if status == 200 else None
    return bool(entry and entry["ssw"].get("hosts", {}).get(where) == state)


def test_a_model_ready_on_b_is_served_through_as_gateway(
    fleet: tuple[Network, RedisServer, FleetHost, FleetHost],
) -> None:
    _, _, a, b = fleet
    unload(a, b, model="shared")
    assert b.admin("POST", "/load", {"model": "shared"})[0] == 200
    wait_for(lambda: seen_ready(a, "shared", b.name), 10, "A to see shared ready on B")
    status, _, answer = chat(a, "shared")
    assert status == 200 and answer["choices"][0]["message"]["content"] == "t0 t1 t2", answer
    assert answer["model"] == "shared"
    # Streamed, through the hop, token by token.
    status, _, stream = http(
        "POST",
        a.public + "/v1/chat/completions",
        {"model": "shared", "messages": CHAT, "max_tokens": 2, "stream": True},
    )
    assert status == 200 and "t0 " in stream and "[DONE]" in stream
    assert not a.workers("shared"), "A started a worker although B had one ready"
    # B's gateway served it, for A (its access log names the host-to-host request).
    wait_for(lambda: "model=shared" in b.gateway.log(), 5, "B's access log of the request A relayed")
    # A client cannot pass for a host of the fleet.
    forged = http(
        "POST",
        b.public + "/v1/chat/completions",
        {"model": "shared", "messages": CHAT},
        headers={"X-SSW-Fleet-Token": "guess", "X-SSW-Fleet-Key": "admin"},
    )
    assert forged[0] == 401
    assert http("POST", b.public + "/v1/ssw/fleet/load", {"model": "burst"})[0] == 401


def test_fifty_clients_over_both_gateways_start_one_unit(
    fleet: tuple[Network, RedisServer, FleetHost, FleetHost],
) -> None:
    _, _, a, b = fleet
    unload(a, b, model="burst")
    before = sum(h.loader.log().count("ssw-worker@burst.service: starting (GPU") for h in (a, b))
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda i: chat(a if i % 2 else b, "burst")[0], range(50)))
    assert results == [200] * 50
    workers = a.workers("burst") + b.workers("burst")
    assert len(workers) == 1, workers
    starts = sum(h.loader.log().count("ssw-worker@burst.service: starting (GPU") for h in (a, b))
    assert starts - before == 1


def test_redis_down_each_host_serves_its_own_and_the_fleet_returns(
    fleet: tuple[Network, RedisServer, FleetHost, FleetHost],
) -> None:
    _, redis, a, b = fleet
    assert a.admin("POST", "/load", {"model": "local"})[0] == 200
    redis.stop()
    try:
        wait_for(lambda: not (a.health().get("fleet") or {}).get("connected", True), 10, "A to notice")
        assert chat(a, "local")[0] == 200
        # Another host's model, loaded nowhere: A loads it itself, as without a fleet.
        unload(a, b, model="solo")
        assert chat(a, "solo")[0] == 200 and ready_on(a, "solo")
        metrics = a.cli("status", "--fleet")
        assert metrics.returncode != 0 and "cannot be reached" in metrics.stderr
    finally:
        redis.start()
    wait_for(lambda: len(fleet_hosts(a)) == 2 and len(fleet_hosts(b)) == 2, 20, "the fleet back")


def test_status_models_and_metrics_show_the_fleet(fleet: tuple[Network, RedisServer, FleetHost, FleetHost]) -> None:
    _, _, a, b = fleet
    assert b.admin("POST", "/load", {"model": "shared"})[0] == 200
    shown = a.cli("status", "--fleet", "--json")
    assert shown.returncode == 0, shown.stderr
    hosts = json.loads(shown.stdout)["hosts"]
    assert set(hosts) == {a.name, b.name}
    assert any(w["model"] == "shared" for w in hosts[b.name]["workers"])
    assert len(hosts[a.name]["gpus"]) == 2 and hosts[b.name]["url"] == b.public
    wait_for(lambda: seen_ready(a, "shared", b.name), 10, "A's /v1/models to show shared on B")
    # Every series says which host it comes from: the loader's and the gateway's.
    loader_metrics = a.admin("GET", "/metrics")[1]
    assert isinstance(loader_metrics, str) and f'ssw_workers{{host="{a.name}",state=' in loader_metrics
    gateway_metrics = a.metrics()
    assert f'ssw_fleet_connected{{host="{a.name}"}} 1.0' in gateway_metrics
    assert f'ssw_fleet_hosts{{host="{a.name}"}} 2.0' in gateway_metrics


def test_host_b_dies_and_its_models_come_up_on_a_within_the_ttl(
    fleet: tuple[Network, RedisServer, FleetHost, FleetHost],
) -> None:
    _, _, a, b = fleet
    unload(a, b, model="solo")
    assert b.admin("POST", "/load", {"model": "solo"})[0] == 200
    wait_for(lambda: seen_ready(a, "solo", b.name), 10, "A to see solo on B")
    assert chat(a, "solo")[0] == 200 and not a.workers("solo")
    b.kill()
    died = time.monotonic()
    try:
        wait_for(lambda: fleet_hosts(a) == [a.name], TTL_S + 5, "A to drop B")
        dropped = time.monotonic() - died
        assert dropped <= TTL_S + 2, dropped
        status, _, answer = chat(a, "solo")
        assert status == 200 and answer["choices"][0]["message"]["content"] == "t0 t1 t2"
        assert ready_on(a, "solo")
    finally:
        b.revive()
        wait_for(lambda: len(fleet_hosts(a)) == 2, 30, "B back in the fleet")


def test_a_load_on_a_host_that_dies_is_placed_again(fleet: tuple[Network, RedisServer, FleetHost, FleetHost]) -> None:
    _, _, a, b = fleet
    unload(a, b, model="slowload")
    assert b.admin("POST", "/load", {"model": "slowload", "wait": False})[0] == 202
    wait_for(lambda: seen_ready(a, "slowload", b.name, "loading"), 10, "A to see slowload loading on B")
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(chat, a, "slowload")  # held: the fleet's load of it is on B
        time.sleep(1)
        b.kill()
        try:
            status, _, answer = waiting.result(timeout=120)
            assert status == 200 and answer["model"] == "slowload", answer
            assert ready_on(a, "slowload")
            assert "slowload: host hostb, which was loading it, is gone; placing it again" in a.gateway.log()
        finally:
            b.revive()
            wait_for(lambda: len(fleet_hosts(a)) == 2, 30, "B back in the fleet")


def test_a_partitioned_host_drops_out_and_comes_back(fleet: tuple[Network, RedisServer, FleetHost, FleetHost]) -> None:
    net, _, a, b = fleet
    unload(a, b, model="shared")
    assert b.admin("POST", "/load", {"model": "shared"})[0] == 200
    wait_for(lambda: seen_ready(a, "shared", b.name), 10, "A to see shared on B")
    net.cut(2)
    try:
        cut = time.monotonic()
        wait_for(lambda: fleet_hosts(a) == [a.name], TTL_S + 5, "A to drop the unreachable B")
        assert time.monotonic() - cut <= TTL_S + 2
        # B's model is loaded and served on A; B, cut off, keeps its own workers.
        status, _, answer = chat(a, "shared")
        assert status == 200 and answer["model"] == "shared"
        assert ready_on(a, "shared") and ready_on(b, "shared")
    finally:
        net.restore(2)
    wait_for(lambda: len(fleet_hosts(a)) == 2, 20, "B back in the fleet")
