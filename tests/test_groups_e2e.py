"""A model across two hosts of a fleet, with the fast fake engine standing in for
vLLM's multi-node backend (its head serves once every other rank joined it on
the master port, and fails when one leaves; a rank ends when its head does):
loaded on demand through either gateway, served by its head only; both hosts
show the group; its units say their rank and group and may reach the group's
other host only; killing the rank on the second host fails the model on both
and it comes back as a new group on a new port, with a request held through
it; unloading stops every rank; a loader restarted on either host adopts its
rank; the member host dropping out of the fleet ends the group on the head.
The same scenario on real vLLM is tests/test_groups_vllm.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.fleet import FleetHost, TwoHosts, two_hosts
from tests.harness.groups import (
    group_id,
    group_ready,
    holding,
    master_port,
    ranks,
    unit_property,
    unload_everywhere,
)
from tests.harness.stack import http, wait_for

pytestmark = pytest.mark.systemd
MODEL = "wide"
MODELS = {
    MODEL: {"path": "fake-a", "vram_gb": 4, "hosts": 2},
    # A model of one host beside it.
    "narrow": {"path": "fake-b", "vram_gb": 2},
}


@pytest.fixture(scope="module")
def fleet(models_root: Path) -> Iterator[TwoHosts]:
    settings = {"heartbeat_s": 0.5, "ttl_s": 4.0, "load_lease_s": 30}
    # Quick retries: a group that broke comes back within seconds.
    extra = {"placement": {"restart_backoff_s": 0.5}}
    with two_hosts("groups", models_root, MODELS, settings, extra) as f:
        yield f
        hosts = f.hosts
    for host in hosts:
        for role in (host.loader, host.gateway):
            assert "Traceback" not in role.log(), role.log()


def chat(host: FleetHost, timeout: float = 120, **kw: Any) -> tuple[int, dict[str, str], Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw}
    return http("POST", host.public + "/v1/chat/completions", body, headers={"X-SSW-Wait": "true"}, timeout=timeout)


def test_loads_on_demand_through_either_gateway_and_serves_from_the_head(fleet: TwoHosts) -> None:
    for via in (fleet.b, fleet.a):
        status, _, body = chat(via)
        assert status == 200, body
        assert body["choices"][0]["message"]["content"], body
        found = ranks(fleet.hosts, MODEL)
        assert sorted(w["rank"] for w in found.values()) == [0, 1], found
        assert len({group_id(w) for w in found.values()}) == 1, found
        head = holding(fleet.hosts, found, 0)
        member = holding(fleet.hosts, found, 1)
        # Every host's status shows the group, naming the head.
        for host in fleet.hosts:
            assert f"{head.name} (head)" in found[host.name]["group"], found
        status_text = member.cli("status").stdout
        assert "rank 1 (headless) of group" in status_text, status_text
        fleet_text = head.cli("status", "--fleet").stdout
        assert f"rank 1 of group {found[member.name]['group']}" in fleet_text, fleet_text
        # The unit says what it is; its rank traffic may reach the group's hosts only.
        unit = found[member.name]["unit"]
        description = unit_property(member, unit, "Description")
        assert f"rank 1 of {MODEL} across 2 hosts (headless; group {group_id(found[member.name])}" in description
        assert unit_property(member, unit, "PrivateNetwork") == "no"
        allowed = unit_property(member, unit, "IPAddressAllow")
        assert head.address in allowed and member.address in allowed and allowed.count("/32") == 2, allowed
        assert "0.0.0.0/0" in unit_property(member, unit, "IPAddressDeny")
        env = unit_property(member, unit, "Environment")
        assert f"VLLM_HOST_IP={member.address}" in env and "GLOO_SOCKET_IFNAME=" in env, env
        # Served by the head only: the member's gateway hops to the head's.
        models_b = http("GET", member.public + "/v1/models")[2]
        hosts = next(m for m in models_b["data"] if m["id"] == MODEL)["ssw"]["hosts"]
        assert hosts == {head.name: "ready", member.name: "rank"}, hosts
        unload_everywhere(fleet.hosts, MODEL)


def test_a_stream_through_the_member_host(fleet: TwoHosts) -> None:
    status, _, body = chat(fleet.a)
    assert status == 200, body
    member = holding(fleet.hosts, ranks(fleet.hosts, MODEL), 1)
    status, _, text = http(
        "POST",
        member.public + "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True},
        timeout=60,
    )
    assert status == 200
    assert str(text).rstrip().endswith("data: [DONE]"), text


def test_a_dead_rank_fails_the_model_on_both_hosts_and_it_comes_back(fleet: TwoHosts) -> None:
    assert chat(fleet.a)[0] == 200
    wait_for(lambda: group_ready(fleet.hosts, MODEL), 30, "the group ready")
    before = ranks(fleet.hosts, MODEL)
    head = holding(fleet.hosts, before, 0)
    member = holding(fleet.hosts, before, 1)
    old_group = group_id(before[head.name])
    old_port = master_port(head, before[head.name]["unit"])
    # A request through the head's gateway that arrives while the group is down is held.
    held: dict[str, Any] = {}

    def later() -> None:
        time.sleep(0.5)
        held["answer"] = chat(head, timeout=120)

    member.box.systemctl("kill", "-s", "KILL", before[member.name]["unit"])
    asker = threading.Thread(target=later)
    asker.start()
    # Both hosts lose it: the head's worker fails with the rank's reason.
    wait_for(
        lambda: (
            all(group_id(w) != old_group for w in ranks(fleet.hosts, MODEL).values()) or not ranks(fleet.hosts, MODEL)
        ),
        30,
        "the broken group gone on both hosts",
    )
    wait_for(lambda: group_ready(fleet.hosts, MODEL), 60, "the model back as a new group")
    after = ranks(fleet.hosts, MODEL)
    new_group = group_id(next(iter(after.values())))
    assert new_group != old_group
    new_head = holding(fleet.hosts, after, 0)
    new_port = master_port(new_head, after[new_head.name]["unit"])
    assert new_port != old_port, "a new start must take a new master port"
    asker.join(150)
    status, _, body = held["answer"]
    assert status == 200, body
    # The head's worker failed with it (its engine ends when a rank goes, or its loader
    # stops it), and the reason is in the logs of both hosts.
    events = head.admin("GET", "/status")[1]["events"]
    assert any(e["kind"] in ("crashed", "failed") and e["unit"] == before[head.name]["unit"] for e in events), events
    assert f"rank 1 on {member.name} ended" in member.loader.log()
    assert f"its group {old_group} had ended: rank 1 on {member.name} ended" in head.loader.log()
    # Only the new start's ranks run: nothing of the old group is left on either host.
    for host in fleet.hosts:
        running = host.box.systemctl("list-units", "--plain", "--no-legend", "ssw-worker@*").stdout
        units = [line.split()[0] for line in running.splitlines() if line.strip()]
        groups = {unit_property(host, u, "Environment").split("SSW_GROUP=")[1].split()[0] for u in units}
        assert groups == {new_group}, (host.name, groups)
    unload_everywhere(fleet.hosts, MODEL)


def test_unloading_stops_every_rank(fleet: TwoHosts) -> None:
    for where in ("head", "member"):
        assert chat(fleet.b)[0] == 200
        wait_for(lambda: group_ready(fleet.hosts, MODEL), 30, "the group ready")
        found = ranks(fleet.hosts, MODEL)
        host = holding(fleet.hosts, found, 0 if where == "head" else 1)
        head = holding(fleet.hosts, found, 0)
        status, body = host.admin("POST", "/unload", {"model": MODEL})
        assert status == 200, body
        # Answered once this host's rank is gone; every rank stops, and nothing loads it again.
        assert not host.workers(MODEL)
        wait_for(lambda: not any(h.workers(MODEL) for h in fleet.hosts), 30, "every rank stopped")
        time.sleep(2)
        assert not any(h.workers(MODEL) for h in fleet.hosts), f"{MODEL} came back after an unload on the {where}"
        assert head.admin("GET", "/status")[1]["models"][MODEL]["load"]["state"] == "idle"


def test_a_restarted_loader_adopts_its_rank(fleet: TwoHosts) -> None:
    assert chat(fleet.a)[0] == 200
    wait_for(lambda: group_ready(fleet.hosts, MODEL), 30, "the group ready")
    before = ranks(fleet.hosts, MODEL)
    for host in fleet.hosts:
        host.loader.stop()
        host.loader.start()
        wait_for(lambda h=host: h.admin("GET", "/health")[0] == 200, 30, f"{host.name}'s loader back")
    wait_for(lambda: group_ready(fleet.hosts, MODEL), 30, "the group adopted")
    after = ranks(fleet.hosts, MODEL)
    assert {h: w["unit"] for h, w in after.items()} == {h: w["unit"] for h, w in before.items()}
    assert all(w["adopted"] for w in after.values()), after
    assert chat(fleet.b)[0] == 200
    unload_everywhere(fleet.hosts, MODEL)


def test_a_member_dropping_out_of_the_fleet_ends_the_group(fleet: TwoHosts) -> None:
    assert chat(fleet.a)[0] == 200
    wait_for(lambda: group_ready(fleet.hosts, MODEL), 30, "the group ready")
    found = ranks(fleet.hosts, MODEL)
    head = holding(fleet.hosts, found, 0)
    member = holding(fleet.hosts, found, 1)
    index = 1 if member is fleet.a else 2
    fleet.net.cut(index)
    try:
        # The head drops it after the TTL and stops its own rank: nothing half-running there.
        wait_for(lambda: not [w for w in head.workers(MODEL) if w["state"] == "ready"], 30, "the head stopped")
    finally:
        fleet.net.restore(index)
    # The member's rank ends too (its group's record ended, or its head went away).
    wait_for(lambda: group_ready(fleet.hosts, MODEL), 90, "the model back on both hosts")
    unload_everywhere(fleet.hosts, MODEL)
