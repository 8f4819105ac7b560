"""What the tests and the benchmark of a model across hosts read off a test fleet: each
host's rank of the model, its group, its unit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tests.harness.fleet import FleetHost
from tests.harness.stack import wait_for


def ranks(hosts: Sequence[FleetHost], model: str) -> dict[str, dict[str, Any]]:
    """host -> its live rank of the model (the worker as its loader shows it)."""
    out = {}
    for host in hosts:
        live = [w for w in host.workers(model) if w["state"] not in ("stopping", "draining")]
        if live:
            assert len(live) == 1, live
            out[host.name] = live[0]
    return out


def group_ready(hosts: Sequence[FleetHost], model: str) -> bool:
    found = ranks(hosts, model)
    return len(found) == len(hosts) and all(w["state"] == "ready" for w in found.values())


def group_id(worker: dict[str, Any]) -> str:
    return str(worker["group"]).split(":", 1)[0]


def holding(hosts: Sequence[FleetHost], found: dict[str, dict[str, Any]], rank: int) -> FleetHost:
    """The host that ran rank ``rank`` when ``found`` (ranks()) was taken."""
    return next(h for h in hosts if h.name in found and found[h.name]["rank"] == rank)


def unit_property(host: FleetHost, unit: str, prop: str) -> str:
    return host.box.systemctl("show", "-p", prop, "--value", unit).stdout.strip()


def master_port(host: FleetHost, unit: str) -> str:
    return unit_property(host, unit, "ExecStart").split("--master-port ")[1].split()[0]


def unload_everywhere(hosts: Sequence[FleetHost], model: str, ask_s: float = 120, wait_s: float = 60) -> None:
    """Unload it on every host (each asked for up to ``ask_s``), and wait up to ``wait_s`` for
    every rank to be gone."""
    for host in hosts:
        host.admin("POST", "/unload", {"model": model}, timeout=ask_s)
    wait_for(lambda: not any(h.workers(model) for h in hosts), wait_s, f"{model}: every rank gone")
