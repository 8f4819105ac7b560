"""A model across two hosts on real vLLM (the CPU build, its multiprocessing
backend over gloo): the two-host test fleet in network namespaces, the tiny
model at tensor parallel 2 across the hosts (one rank each), and at pipeline
parallel 2 (its two layers, one stage per host). Loaded on demand through
either gateway, it serves a chat and a stream; both hosts' status show the
group; killing the rank on the second host fails the model on both and it
comes back (a held request is answered), as a new group on a new master port
that no rank of the old one joined; unloading stops every rank."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness.fleet import FleetHost, Network, Pki, fleet_redis_server, fleet_secret
from tests.harness.stack import WORK_ROOT, RedisServer, http, wait_for

pytestmark = [pytest.mark.systemd, pytest.mark.vllm]
TP, PP = "tiny-tp", "tiny-pp"
LOAD_S = 400  # a cold start of two ranks on 2 shared cores, with room for a slow CI machine


@dataclass
class Fleet:
    net: Network
    redis: RedisServer
    a: FleetHost
    b: FleetHost

    @property
    def hosts(self) -> tuple[FleetHost, FleetHost]:
        return self.a, self.b


@pytest.fixture(scope="module")
def fleet(tiny_model: Path) -> Iterator[Fleet]:
    root = WORK_ROOT / f"groups-vllm-{secrets.token_hex(3)}"
    root.mkdir(parents=True)
    net = Network().up()
    pki = Pki(root / "pki")
    redis = fleet_redis_server(root, net, pki)
    settings = {"redis_url": redis.url, "credential_file": str(fleet_secret(root)), "heartbeat_s": 1.0, "ttl_s": 6.0}
    models = {
        TP: {"path": tiny_model.name, "vram_gb": 2, "hosts": 2, "tensor_parallel_size": 2},
        PP: {"path": tiny_model.name, "vram_gb": 2, "hosts": 2, "pipeline_parallel_size": 2},
    }
    extra = {
        "health": {"start_timeout_s": LOAD_S},
        "placement": {"restart_backoff_s": 1.0},
        "gateway": {"wait_timeout_s": LOAD_S},
    }
    hosts: list[FleetHost] = []
    try:
        for index in (1, 2):
            hosts.append(FleetHost.start(net, index, root, tiny_model.parent, models, settings, extra, pki, "vllm"))
        f = Fleet(net, redis, *hosts)
        wait_for(lambda: all(len(fleet_hosts(h)) == 2 for h in hosts), 30, "both hosts to see each other")
        yield f
    finally:
        for host in hosts:
            host.stop()
        redis.stop()
        net.down()


def fleet_hosts(host: FleetHost) -> list[str]:
    _, _, body = http("GET", host.public + "/health")
    return list(body.get("fleet", {}).get("hosts", [])) if isinstance(body, dict) else []


def chat(host: FleetHost, model: str, **kw: Any) -> tuple[int, dict[str, str], Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 8, **kw}
    return http("POST", host.public + "/v1/chat/completions", body, headers={"X-SSW-Wait": "true"}, timeout=LOAD_S)


def ranks(f: Fleet, model: str) -> dict[str, dict[str, Any]]:
    out = {}
    for host in f.hosts:
        live = [w for w in host.workers(model) if w["state"] not in ("stopping", "draining")]
        if live:
            out[host.name] = live[0]
    return out


def group_ready(f: Fleet, model: str) -> bool:
    found = ranks(f, model)
    return len(found) == 2 and all(w["state"] == "ready" for w in found.values())


def group_id(worker: dict[str, Any]) -> str:
    return str(worker["group"]).split(":", 1)[0]


def master_port(host: FleetHost, unit: str) -> str:
    argv = host.box.systemctl("show", "-p", "ExecStart", "--value", unit).stdout
    return argv.split("--master-port ")[1].split()[0]


def unload_everywhere(f: Fleet, model: str) -> None:
    for host in f.hosts:
        host.admin("POST", "/unload", {"model": model}, timeout=200)
    wait_for(lambda: not any(h.workers(model) for h in f.hosts), 120, "every rank gone")


def test_tensor_parallel_across_two_hosts(fleet: Fleet) -> None:
    # On demand through host B's gateway: whichever host heads it, B's clients are served.
    started = time.monotonic()
    status, _, body = chat(fleet.b, TP)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"], body
    print(f"\ncold start of {TP} across 2 hosts, through B: {time.monotonic() - started:.1f} s")
    found = ranks(fleet, TP)
    assert sorted(w["rank"] for w in found.values()) == [0, 1], found
    head = next(h for h in fleet.hosts if found[h.name]["rank"] == 0)
    member = next(h for h in fleet.hosts if found[h.name]["rank"] == 1)
    for host in fleet.hosts:
        text = host.cli("status").stdout
        assert f"of group {group_id(found[host.name])}" in text, text
    # A stream, through the other gateway.
    status, _, text = http(
        "POST",
        fleet.a.public + "/v1/chat/completions",
        {"model": TP, "messages": [{"role": "user", "content": "Count."}], "max_tokens": 16, "stream": True},
        timeout=120,
    )
    assert status == 200 and str(text).count("data: {") >= 2 and str(text).rstrip().endswith("data: [DONE]"), text

    # Killing the rank on the second host fails the model on both; it comes back.
    old_group = group_id(found[head.name])
    old_port = master_port(head, found[head.name]["unit"])
    held: dict[str, Any] = {}

    def ask_later() -> None:
        time.sleep(2)
        held["answer"] = chat(head, TP)

    member.box.systemctl("kill", "-s", "KILL", found[member.name]["unit"])
    asker = threading.Thread(target=ask_later)
    asker.start()
    wait_for(
        lambda: not [w for w in head.workers(TP) if group_id(w) == old_group and w["state"] == "ready"],
        120,
        "the head of the broken group to stop serving",
    )
    wait_for(lambda: group_ready(fleet, TP), LOAD_S, "the model back as a new group")
    asker.join(LOAD_S)
    status, _, body = held["answer"]
    assert status == 200, body
    after = ranks(fleet, TP)
    new_head = next(h for h in fleet.hosts if after[h.name]["rank"] == 0)
    assert group_id(after[new_head.name]) != old_group
    assert master_port(new_head, after[new_head.name]["unit"]) != old_port
    for host in fleet.hosts:
        # Every rank unit still loaded is of the new start: no stale rank joined it.
        listed = host.box.systemctl("list-units", "--plain", "--no-legend", "ssw-worker@*").stdout
        units = [line.split()[0] for line in listed.splitlines() if line.strip()]
        envs = [host.box.systemctl("show", "-p", "Environment", "--value", u).stdout for u in units]
        assert all(f"SSW_GROUP={group_id(after[new_head.name])}" in e for e in envs), (host.name, envs)
    assert chat(fleet.a, TP)[0] == 200

    # Unloading stops every rank.
    status, body = new_head.admin("POST", "/unload", {"model": TP}, timeout=200)
    assert status == 200, body
    wait_for(lambda: not any(h.workers(TP) for h in fleet.hosts), 120, "every rank stopped")


def test_pipeline_parallel_across_two_hosts(fleet: Fleet) -> None:
    status, _, body = chat(fleet.a, PP)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"], body
    found = ranks(fleet, PP)
    assert sorted(w["rank"] for w in found.values()) == [0, 1], found
    head = next(h for h in fleet.hosts if found[h.name]["rank"] == 0)
    argv = head.box.systemctl("show", "-p", "ExecStart", "--value", found[head.name]["unit"]).stdout
    assert "--pipeline-parallel-size 2" in argv and "--nnodes 2" in argv, argv
    unload_everywhere(fleet, PP)
