"""A model across two hosts on real vLLM (the CPU build, its multiprocessing
backend over gloo): the two-host test fleet in network namespaces, the tiny
model at tensor parallel 2 across the hosts (one rank each), and at pipeline
parallel 2 (its two layers, one stage per host). Loaded on demand through
either gateway, it serves a chat and a stream; both hosts' status show the
group; killing the rank on the second host fails the model on both and it
comes back (a held request is answered), as a new group on a new master port
that no rank of the old one joined; unloading stops every rank."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.fleet import FleetHost, TwoHosts, two_hosts
from tests.harness.groups import group_id, group_ready, holding, master_port, ranks, unload_everywhere
from tests.harness.stack import http, wait_for

pytestmark = [pytest.mark.systemd, pytest.mark.vllm]
TP, PP = "tiny-tp", "tiny-pp"
LOAD_S = 400  # a cold start of two ranks on 2 shared cores, with room for a slow CI machine


@pytest.fixture(scope="module")
def fleet(tiny_model: Path) -> Iterator[TwoHosts]:
    models = {
        TP: {"path": tiny_model.name, "vram_gb": 2, "hosts": 2, "tensor_parallel_size": 2},
        PP: {"path": tiny_model.name, "vram_gb": 2, "hosts": 2, "pipeline_parallel_size": 2},
    }
    extra = {
        "health": {"start_timeout_s": LOAD_S},
        "placement": {"restart_backoff_s": 1.0},
        "gateway": {"wait_timeout_s": LOAD_S},
    }
    settings = {"heartbeat_s": 1.0, "ttl_s": 6.0}
    with two_hosts("groups-vllm", tiny_model.parent, models, settings, extra, "vllm") as f:
        yield f


def chat(host: FleetHost, model: str, **kw: Any) -> tuple[int, dict[str, str], Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 8, **kw}
    return http("POST", host.public + "/v1/chat/completions", body, headers={"X-SSW-Wait": "true"}, timeout=LOAD_S)


def test_tensor_parallel_across_two_hosts(fleet: TwoHosts) -> None:
    # On demand through host B's gateway: whichever host heads it, B's clients are served.
    started = time.monotonic()
    status, _, body = chat(fleet.b, TP)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"], body
    print(f"\ncold start of {TP} across 2 hosts, through B: {time.monotonic() - started:.1f} s")
    found = ranks(fleet.hosts, TP)
    assert sorted(w["rank"] for w in found.values()) == [0, 1], found
    head = holding(fleet.hosts, found, 0)
    member = holding(fleet.hosts, found, 1)
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
    wait_for(lambda: group_ready(fleet.hosts, TP), LOAD_S, "the model back as a new group")
    asker.join(LOAD_S)
    status, _, body = held["answer"]
    assert status == 200, body
    after = ranks(fleet.hosts, TP)
    new_head = holding(fleet.hosts, after, 0)
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


def test_pipeline_parallel_across_two_hosts(fleet: TwoHosts) -> None:
    status, _, body = chat(fleet.a, PP)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"], body
    found = ranks(fleet.hosts, PP)
    assert sorted(w["rank"] for w in found.values()) == [0, 1], found
    head = holding(fleet.hosts, found, 0)
    argv = head.box.systemctl("show", "-p", "ExecStart", "--value", found[head.name]["unit"]).stdout
    assert "--pipeline-parallel-size 2" in argv and "--nnodes 2" in argv, argv
    unload_everywhere(fleet.hosts, PP, ask_s=200, wait_s=120)
