"""A fleet of two hosts on one shared Redis over TLS, each a disposable systemd
host in its own network namespace with the production ports and its own
models (some on both, some on one only): a model ready on host B is served
through host A's gateway, over mutual TLS with a signed claim that nothing on
the wire gives away; forged, expired, replayed and unknown-key hops are
refused; a scoped key's hop never falls back outside its scope; 50 clients
over both gateways asking for a model loaded nowhere start exactly one unit
fleet-wide; host B dies, or is cut off, or only its gateway is (an asymmetric
partition), and its models are served on A; waiters released by a ready on
the other host go there; a load on the other host that ends without a worker
fails its waiters at once; stored Responses made through a hop are
retrieved, continued and cancelled through it; with the fleet's Redis down
each host serves its own models, and the fleet comes back when it does."""

from __future__ import annotations

import http.client as http_client
import json
import secrets
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from ssw.gateway import hops
from tests.harness.fleet import FLEET_PORT, FleetHost, Network, Pki, fleet_hosts, fleet_redis_server, fleet_secret
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
# Each host's own: B's are on no other host (disjoint model sets).
ONLY_A = {
    # Slow to load here, quick on B: B has it ready first.
    "racer": {"path": "fake-a", "vram_gb": 2, "env": {"SSW_FAKE_LOAD_DELAY": "10"}},
}
ONLY_B = {
    "onlyb": {"path": "fake-a", "vram_gb": 2},
    "racer": {"path": "fake-a", "vram_gb": 2, "env": {"SSW_FAKE_LOAD_DELAY": "1"}},
    "slowb": {"path": "fake-b", "vram_gb": 2, "env": {"SSW_FAKE_LOAD_DELAY": "15"}},
    # Never loads; its default is to fall back to shared, which a scoped key may not use.
    "flakyb": {
        "path": "fake-b",
        "vram_gb": 2,
        "fallbacks": ["shared"],
        "fallback_default": True,
        "env": {"SSW_FAKE_FAIL": "exit-on-start"},
    },
}


@dataclass
class Fleet:
    net: Network
    redis: RedisServer
    a: FleetHost
    b: FleetHost
    pki: Pki
    secret: bytes
    keys: dict[str, str]  # name -> secret


@pytest.fixture(scope="module")
def fleet(models_root: Path) -> Iterator[Fleet]:
    root = WORK_ROOT / f"fleet-{secrets.token_hex(3)}"
    root.mkdir(parents=True)
    net = Network().up()
    pki = Pki(root / "pki")
    redis = fleet_redis_server(root, net, pki)
    token = fleet_secret(root)
    settings = {
        "redis_url": redis.url,
        "credential_file": str(token),
        "heartbeat_s": 0.5,
        "ttl_s": TTL_S,
        "load_lease_s": 30,
    }
    # One key file for the whole fleet, as the Ansible role distributes it.
    extra = {"auth": {"enabled": True, "keys_file": str(root / "keys.yaml")}}
    hosts: list[FleetHost] = []
    try:
        for index, own in ((1, ONLY_A), (2, ONLY_B)):
            hosts.append(FleetHost.start(net, index, root, models_root, {**MODELS, **own}, settings, extra, pki))
        a, b = hosts
        keys = {}
        for name, scope in (("full", []), ("scoped", ["--models", "flakyb"])):
            added = a.cli("keys", "add", name, *scope)
            assert added.returncode == 0, added.stderr
            keys[name] = added.stdout.strip()
        f = Fleet(net, redis, a, b, pki, token.read_text().strip().encode(), keys)
        wait_for(lambda: all(len(fleet_hosts(h)) == 2 for h in hosts), 30, "both hosts to see each other")
        wait_for(lambda: all(models(f, h) for h in hosts), 10, "both gateways to take the keys")
        yield f
    finally:
        for host in hosts:
            host.stop()
        redis.stop()
        net.down()
    for host in hosts:
        for role in (host.loader, host.gateway):
            assert "Traceback" not in role.log(), role.log()


def auth(f: Fleet, key: str = "full") -> dict[str, str]:
    return {"Authorization": f"Bearer {f.keys[key]}"}


def models(f: Fleet, host: FleetHost, key: str = "full") -> dict[str, Any]:
    status, _, body = http("GET", host.public + "/v1/models", headers=auth(f, key))
    return {m["id"]: m for m in body["data"]} if status == 200 else {}


def chat(f: Fleet, host: FleetHost, model: str, key: str = "full", **kw: Any) -> tuple[int, dict[str, str], Any]:
    body = {"model": model, "messages": CHAT, "max_tokens": 3, **kw}
    headers = {"X-SSW-Wait": "true", **auth(f, key)}
    return http("POST", host.public + "/v1/chat/completions", body, headers=headers, timeout=120)


def unload(*hosts: FleetHost, model: str) -> None:
    for host in hosts:
        host.admin("POST", "/unload", {"model": model})
    wait_for(lambda: not any(h.workers(model) for h in hosts), 60, f"{model} unloaded everywhere")


def ready_on(host: FleetHost, model: str) -> bool:
    return any(w["state"] == "ready" for w in host.workers(model))


def seen_ready(f: Fleet, viewer: FleetHost, model: str, where: str, state: str = "ready") -> bool:
    entry = models(f, viewer).get(model)
    return bool(entry and entry["ssw"].get("hosts", {}).get(where) == state)


def hop(
    f: Fleet, to: FleetHost, claim: bytes | None, body: bytes, path: str = "/v1/chat/completions", cert: bool = True
) -> tuple[int, Any]:
    """A request to a host's fleet listener, as another host's gateway sends one (A's certificate)."""
    ctx = ssl.create_default_context(cafile=str(f.pki.ca))
    if cert:
        ctx.load_cert_chain(*f.pki.issue(f.a.name, f.a.address))
    conn = http_client.HTTPSConnection(to.address, FLEET_PORT, context=ctx, timeout=30)
    try:
        headers = {"Content-Type": "application/json", **({"X-SSW-Fleet-Claim": claim.decode()} if claim else {})}
        conn.request("POST", path, body, headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def claim_for(f: Fleet, to: FleetHost, body: bytes, key: str = "full", **kw: Any) -> bytes:
    fields: dict[str, Any] = {
        "iss": f.a.name,
        "aud": to.name,
        "key": key,
        "priority": "interactive",
        "wait": True,
        "fallback": None,
        "method": "POST",
        "path": "/v1/chat/completions",
        "body": body,
        **kw,
    }
    secret = fields.pop("secret", f.secret)
    return hops.make(secret, **fields).encode()


class Capture:
    """Every frame on one link of the fleet's network while it runs (a raw packet
    socket): what an eavesdropper on it would see."""

    def __init__(self, interface: str) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
        self.sock.bind((interface, 0))
        self.sock.settimeout(0.2)
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.frames.append(self.sock.recv(65535))
            except TimeoutError:
                continue

    def stop(self) -> bytes:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        return b"".join(self.frames)


def test_a_model_ready_on_b_is_served_through_as_gateway(fleet: Fleet) -> None:
    a, b = fleet.a, fleet.b
    unload(a, b, model="shared")
    assert b.admin("POST", "/load", {"model": "shared"})[0] == 200
    wait_for(lambda: seen_ready(fleet, a, "shared", b.name), 10, "A to see shared ready on B")
    status, _, answer = chat(fleet, a, "shared")
    assert status == 200 and answer["choices"][0]["message"]["content"] == "t0 t1 t2", answer
    assert answer["model"] == "shared"
    # Streamed, through the hop, token by token.
    status, _, stream = http(
        "POST",
        a.public + "/v1/chat/completions",
        {"model": "shared", "messages": CHAT, "max_tokens": 2, "stream": True},
        headers=auth(fleet),
    )
    assert status == 200 and "t0 " in stream and "[DONE]" in stream
    assert not a.workers("shared"), "A started a worker although B had one ready"
    # B's gateway served it, for A's client's key (its access log names it).
    wait_for(lambda: "key=full model=shared" in b.gateway.log(), 5, "B's access log of the request A relayed")


def test_a_hop_shows_nothing_on_the_wire_and_only_a_fresh_claim_from_the_fleet_passes(fleet: Fleet) -> None:
    a, b = fleet.a, fleet.b
    assert b.admin("POST", "/load", {"model": "shared"})[0] == 200
    wait_for(lambda: seen_ready(fleet, a, "shared", b.name), 10, "A to see shared ready on B")
    marker = "purple-elephant-" + secrets.token_hex(6)
    capture = Capture(fleet.net.link(2))  # B's link: every byte to and from B
    try:
        status, _, answer = chat(fleet, a, "shared", messages=[{"role": "user", "content": marker}])
    finally:
        wire = capture.stop()
    assert status == 200, answer
    assert b"\x17\x03\x03" in wire  # the hop was seen: TLS application data records
    for secret in (marker.encode(), fleet.secret, fleet.keys["full"].encode(), b"key=full", b'"full"'):
        assert secret not in wire, secret
    body = json.dumps({"model": "shared", "messages": CHAT, "max_tokens": 2}).encode()
    # The public port never takes a hop, however well signed.
    status, _, answer = http(
        "POST",
        b.public + "/v1/chat/completions",
        body,
        headers={"X-SSW-Fleet-Claim": claim_for(fleet, b, body).decode(), "Content-Type": "application/json"},
    )
    assert status == 401 and answer["error"]["code"] == "invalid_fleet_claim"
    assert http("POST", b.public + "/v1/ssw/fleet/load", {"model": "shared"})[0] == 401
    # The fleet listener: no client certificate, no connection.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        hop(fleet, b, claim_for(fleet, b, body), body, cert=False)
    # A fresh claim of the fleet passes, once.
    fresh = claim_for(fleet, b, body)
    assert hop(fleet, b, fresh, body)[0] == 200
    refusals = {
        "no claim": hop(fleet, b, None, body),
        "replayed": hop(fleet, b, fresh, body),
        "forged": hop(fleet, b, claim_for(fleet, b, body, secret=b"not the fleet's"), body),
        "expired": hop(fleet, b, claim_for(fleet, b, body, now=time.time() - 120), body),
        "unknown key": hop(fleet, b, claim_for(fleet, b, body, key="nobody"), body),
        "another body": hop(fleet, b, claim_for(fleet, b, body), body.replace(b"2", b"9")),
        "for host A": hop(fleet, b, claim_for(fleet, b, body, aud=a.name), body),
    }
    for why, (status, answer) in refusals.items():
        assert status == 401 and answer["error"]["code"] == "invalid_fleet_claim", (why, status, answer)


def test_a_model_only_on_b_is_loaded_and_served_there_through_a(fleet: Fleet) -> None:
    a, b = fleet.a, fleet.b
    unload(b, model="onlyb")
    assert "onlyb" in models(fleet, a) and "onlyb" not in a.admin("GET", "/status")[1]["models"]
    status, _, answer = chat(fleet, a, "onlyb")
    assert status == 200 and answer["model"] == "onlyb", answer
    assert ready_on(b, "onlyb") and not a.workers("onlyb")


def test_a_scoped_keys_hop_never_falls_back_outside_its_scope(fleet: Fleet) -> None:
    a, b = fleet.a, fleet.b
    assert b.admin("POST", "/load", {"model": "shared"})[0] == 200
    wait_for(lambda: seen_ready(fleet, a, "shared", b.name), 10, "A to see shared ready on B")
    # flakyb cannot load; its default fallback (shared) is outside the scoped key's scope.
    status, headers, answer = chat(fleet, a, "flakyb", key="scoped")
    assert status == 503 and "x-ssw-fallback-from" not in headers, (status, answer)
    assert "shared" not in json.dumps(answer)
    # The same key straight at B's fleet listener: no fallback on the far side either.
    body = json.dumps({"model": "flakyb", "messages": CHAT, "max_tokens": 2}).encode()
    status, answer = hop(fleet, b, claim_for(fleet, b, body, key="scoped", fallback=True), body)
    assert status == 503, answer
    # A key for every model gets shared in flakyb's place: the fallback is A's to apply.
    status, headers, answer = chat(fleet, a, "flakyb")
    assert status == 200 and answer["model"] == "shared" and headers["x-ssw-fallback-from"] == "flakyb"


def test_an_asymmetric_partition_serves_bs_model_on_a(fleet: Fleet) -> None:
    """A reaches the fleet's Redis but not B (a route on A's side only): B's record says
    its model is ready, but A cannot reach it, so A loads and serves it itself."""
    a, b = fleet.a, fleet.b
    unload(a, b, model="solo")
    assert b.admin("POST", "/load", {"model": "solo"})[0] == 200
    wait_for(lambda: seen_ready(fleet, a, "solo", b.name), 10, "A to see solo on B")
    subprocess.run(["ip", "-n", a.netns, "route", "add", "unreachable", f"{b.address}/32"], check=True)
    try:
        assert fleet_hosts(a) == sorted([a.name, b.name]) or len(fleet_hosts(a)) == 2  # Redis: B is alive
        status, _, answer = chat(fleet, a, "solo")
        assert status == 200 and answer["model"] == "solo", answer
        assert ready_on(a, "solo")
        assert f"fleet: host {b.name} cannot be reached from here" in a.gateway.log()
    finally:
        subprocess.run(["ip", "-n", a.netns, "route", "del", "unreachable", f"{b.address}/32"], check=True)
    # A says so while it passes B over, and routes to it again once that time is up.
    assert b.name in (a.health()["fleet"]["unreachable"] or [b.name])
    wait_for(lambda: not a.health()["fleet"]["unreachable"], 20, "A to route to B again")


def test_waiters_of_a_load_here_are_served_by_a_ready_on_the_other_host(fleet: Fleet) -> None:
    a, b = fleet.a, fleet.b
    unload(a, b, model="racer")
    assert a.admin("POST", "/load", {"model": "racer", "wait": False})[0] == 202  # 10 s here
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(chat, fleet, a, "racer")
        time.sleep(1)
        assert b.admin("POST", "/load", {"model": "racer"})[0] == 200  # 1 s there
        status, _, answer = waiting.result(timeout=60)
    assert status == 200 and answer["model"] == "racer", answer
    wait_for(lambda: "key=full model=racer" in b.gateway.log(), 5, "B to have served it")
    unload(a, b, model="racer")


def test_a_load_on_the_other_host_that_ends_without_a_worker_fails_its_waiters_at_once(fleet: Fleet) -> None:
    a, b = fleet.a, fleet.b
    unload(b, model="slowb")
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(chat, fleet, a, "slowb")  # held: B loads it (15 s)
        wait_for(lambda: seen_ready(fleet, a, "slowb", b.name, "loading"), 10, "the load on B")
        b.admin("POST", "/unload", {"model": "slowb"})  # B's operator cancels it
        cancelled = time.monotonic()
        status, _, answer = waiting.result(timeout=60)
    assert status == 503 and "on host hostb ended without a worker" in answer["error"]["message"], answer
    assert time.monotonic() - cancelled < 3  # within a heartbeat or two, not wait_timeout_s


def test_stored_responses_made_through_a_hop_are_retrieved_continued_and_cancelled_through_it(fleet: Fleet) -> None:
    a, b = fleet.a, fleet.b
    assert b.admin("POST", "/load", {"model": "onlyb"})[0] == 200
    wait_for(lambda: seen_ready(fleet, a, "onlyb", b.name), 10, "A to see onlyb on B")
    with openai.OpenAI(base_url=a.public + "/v1", api_key=fleet.keys["full"], max_retries=0, timeout=60) as c:
        first = c.responses.create(model="onlyb", input="hello", max_output_tokens=3)
        assert first.output_text == "t0 t1 t2"
        assert c.responses.retrieve(first.id).output_text == "t0 t1 t2"
        follow = c.responses.create(model="onlyb", input="more", previous_response_id=first.id, max_output_tokens=2)
        assert follow.output_text == f"t0 t1 (after {first.id})"
        queued = c.responses.create(model="onlyb", input="long", background=True, max_output_tokens=4)
        assert c.responses.cancel(queued.id).status == "cancelled"
        assert c.responses.retrieve(queued.id).status == "cancelled"
    # Another key of the fleet cannot see it, through either gateway.
    added = a.cli("keys", "add", "other")
    other = added.stdout.strip()
    for host in (a, b):
        wait_for(lambda h=host: http("GET", h.public + "/v1/models", headers={"Authorization": f"Bearer {other}"})[0]
                 == 200, 10, "the new key")  # fmt: skip
        status, _, _ = http(
            "GET", f"{host.public}/v1/responses/{first.id}", headers={"Authorization": f"Bearer {other}"}
        )
        assert status == 404


def test_fifty_clients_over_both_gateways_start_one_unit(fleet: Fleet) -> None:
    a, b = fleet.a, fleet.b
    unload(a, b, model="burst")
    before = sum(h.loader.log().count("ssw-worker@burst.service: starting (GPU") for h in (a, b))
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda i: chat(fleet, a if i % 2 else b, "burst")[0], range(50)))
    assert results == [200] * 50
    workers = a.workers("burst") + b.workers("burst")
    assert len(workers) == 1, workers
    starts = sum(h.loader.log().count("ssw-worker@burst.service: starting (GPU") for h in (a, b))
    assert starts - before == 1


def test_redis_down_each_host_serves_its_own_and_the_fleet_returns(fleet: Fleet) -> None:
    redis, a, b = fleet.redis, fleet.a, fleet.b
    assert a.admin("POST", "/load", {"model": "local"})[0] == 200
    redis.stop()
    try:
        wait_for(lambda: not (a.health().get("fleet") or {}).get("connected", True), 10, "A to notice")
        assert chat(fleet, a, "local")[0] == 200
        # Another host's model, loaded nowhere: once what A last heard of B is older than
        # the TTL, A loads it itself, as without a fleet.
        unload(a, b, model="solo")
        wait_for(lambda: b.name not in a.health()["fleet"]["hosts"], TTL_S + 5, "A to let go of B's last record")
        assert chat(fleet, a, "solo")[0] == 200 and ready_on(a, "solo")
        metrics = a.cli("status", "--fleet")
        assert metrics.returncode != 0 and "cannot be reached" in metrics.stderr
    finally:
        redis.start()
    wait_for(lambda: len(fleet_hosts(a)) == 2 and len(fleet_hosts(b)) == 2, 20, "the fleet back")


def test_status_models_and_metrics_show_the_fleet(fleet: Fleet) -> None:
    a, b = fleet.a, fleet.b
    assert b.admin("POST", "/load", {"model": "shared"})[0] == 200
    shown = a.cli("status", "--fleet", "--json")
    assert shown.returncode == 0, shown.stderr
    hosts = json.loads(shown.stdout)["hosts"]
    assert set(hosts) == {a.name, b.name}
    assert any(w["model"] == "shared" for w in hosts[b.name]["workers"])
    assert len(hosts[a.name]["gpus"]) == 2 and hosts[b.name]["url"] == f"https://{b.address}:{FLEET_PORT}"
    wait_for(lambda: seen_ready(fleet, a, "shared", b.name), 10, "A's /v1/models to show shared on B")
    # Every series says which host it comes from: the loader's and the gateway's.
    loader_metrics = a.admin("GET", "/metrics")[1]
    assert isinstance(loader_metrics, str) and f'ssw_workers{{host="{a.name}",state=' in loader_metrics
    gateway_metrics = a.metrics()
    assert f'ssw_fleet_connected{{host="{a.name}"}} 1.0' in gateway_metrics
    assert f'ssw_fleet_hosts{{host="{a.name}"}} 2.0' in gateway_metrics


def test_host_b_dies_and_its_models_come_up_on_a_within_the_ttl(fleet: Fleet) -> None:
    a, b = fleet.a, fleet.b
    unload(a, b, model="solo")
    assert b.admin("POST", "/load", {"model": "solo"})[0] == 200
    wait_for(lambda: seen_ready(fleet, a, "solo", b.name), 10, "A to see solo on B")
    assert chat(fleet, a, "solo")[0] == 200 and not a.workers("solo")
    b.kill()
    died = time.monotonic()
    try:
        wait_for(lambda: fleet_hosts(a) == [a.name], TTL_S + 5, "A to drop B")
        dropped = time.monotonic() - died
        assert dropped <= TTL_S + 2, dropped
        status, _, answer = chat(fleet, a, "solo")
        assert status == 200 and answer["choices"][0]["message"]["content"] == "t0 t1 t2"
        assert ready_on(a, "solo")
    finally:
        b.revive()
        wait_for(lambda: len(fleet_hosts(a)) == 2, 30, "B back in the fleet")


def test_a_load_on_a_host_that_dies_is_placed_again(fleet: Fleet) -> None:
    a, b = fleet.a, fleet.b
    unload(a, b, model="slowload")
    assert b.admin("POST", "/load", {"model": "slowload", "wait": False})[0] == 202
    wait_for(lambda: seen_ready(fleet, a, "slowload", b.name, "loading"), 10, "A to see slowload loading on B")
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(chat, fleet, a, "slowload")  # held: the fleet's load of it is on B
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


def test_a_partitioned_host_drops_out_and_comes_back(fleet: Fleet) -> None:
    net, a, b = fleet.net, fleet.a, fleet.b
    unload(a, b, model="shared")
    assert b.admin("POST", "/load", {"model": "shared"})[0] == 200
    wait_for(lambda: seen_ready(fleet, a, "shared", b.name), 10, "A to see shared on B")
    net.cut(2)
    try:
        cut = time.monotonic()
        wait_for(lambda: fleet_hosts(a) == [a.name], TTL_S + 5, "A to drop the unreachable B")
        assert time.monotonic() - cut <= TTL_S + 2
        # B's model is loaded and served on A; B, cut off, keeps its own workers.
        status, _, answer = chat(fleet, a, "shared")
        assert status == 200 and answer["model"] == "shared"
        assert ready_on(a, "shared") and ready_on(b, "shared")
    finally:
        net.restore(2)
    wait_for(lambda: len(fleet_hosts(a)) == 2, 20, "B back in the fleet")
