"""The gateway's view of names and workers, with and without a fleet (pure)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest

from ssw.common.contract import HostRecord, ModelView, Snapshot, SplitView, WorkerView
from ssw.common.states import WorkerState
from ssw.errors import ModelNotFound
from ssw.gateway.names import Names, pick


def worker(model: str, unit: str, state: WorkerState = WorkerState.READY, adapters: tuple[str, ...] = ()) -> WorkerView:
    return WorkerView(
        unit=unit, model=model, replica=1, state=state, gpus=[0], socket=f"/run/{unit}", adapters=list(adapters)
    )


def record(
    host: str, models: list[str], workers: list[WorkerView], aliases: dict[str, str] | None = None
) -> HostRecord:
    return HostRecord(
        host=host,
        url=f"http://{host}:8000",
        epoch="e",
        at=0.0,
        gpus=[],
        models={m: ModelView(capabilities=["chat"]) for m in models},
        aliases=aliases or {},
        workers=workers,
    )


@dataclass
class Fleet:
    host: str
    hosts: dict[str, HostRecord] = field(default_factory=dict)
    version: int = 1
    cut_off: set[str] = field(default_factory=set)  # hosts this one cannot reach

    def reachable(self, host: str) -> bool:
        return host not in self.cut_off


SNAP = Snapshot(
    epoch="e",
    seq=1,
    models={"local": ModelView(capabilities=["chat"]), "both": ModelView(capabilities=["chat"])},
    aliases={"light": "local"},
    workers=[worker("local", "ssw-worker@local")],
)


def test_without_a_fleet_only_this_hosts_models() -> None:
    names = Names(SNAP)
    assert set(names.models) == {"local", "both"} and names.remote == {}
    assert names.resolve("light") == "local"


def test_other_hosts_ready_models_are_workers_reached_through_their_gateways() -> None:
    fleet = Fleet(
        "a",
        {
            "a": record("a", ["local", "both"], [worker("local", "ssw-worker@local")]),
            "b": record(
                "b",
                ["both", "remote-only", "base", "npc"],
                [
                    worker("both", "ssw-worker@both"),
                    worker("remote-only", "ssw-worker@remote-only", WorkerState.STARTING),
                    worker("base", "ssw-worker@base", adapters=("npc",)),
                ],
                {"heavy": "remote-only"},
            ),
        },
    )
    names = Names(SNAP, fleet)  # type: ignore[arg-type]
    assert [w.socket for w in names.remote["both"]] == ["http://b:8000"]
    assert names.remote["both"][0].unit == "b/both"
    assert "remote-only" not in names.remote  # starting there: not ready
    assert names.remote["npc"][0].socket == "http://b:8000"  # an adapter its ready worker holds
    assert names.resolve("heavy") == "remote-only"  # another host's alias
    assert names.resolve("light") == "local"
    assert names.hosts["both"] == {"a": "unloaded", "b": "ready"}
    assert names.hosts["remote-only"] == {"b": "loading"}
    # A host this one cannot reach (an asymmetric partition) serves nothing through it.
    fleet.cut_off = {"b"}
    assert Names(SNAP, fleet).remote == {}  # type: ignore[arg-type]
    assert names.state("both") == "ready" and names.state("remote-only") == "loading"
    # This host's own record never makes remote workers of its own.
    assert "local" not in names.remote


SHARES = {"a": 80.0, "b": 20.0}


def test_a_split_spreads_callers_by_share_and_keeps_each_on_one_model() -> None:
    picked = Counter(pick("dialogue", SHARES, f"user:{i}") for i in range(4000))
    assert abs(picked["a"] / 4000 - 0.8) < 0.03
    for i in range(50):
        assert len({pick("dialogue", SHARES, f"key:k{i}") for _ in range(5)}) == 1


def test_a_failing_model_gives_its_share_to_the_others_unless_all_fail() -> None:
    assert {pick("dialogue", SHARES, f"user:{i}", failing={"a"}) for i in range(200)} == {"b"}
    assert {pick("dialogue", SHARES, f"user:{i}", failing={"a", "b"}) for i in range(200)} == {"a", "b"}


def test_a_split_name_resolves_to_its_callers_model_and_expands_to_all() -> None:
    snap = Snapshot(
        epoch="e",
        seq=1,
        models={"a": ModelView(), "b": ModelView()},
        aliases={},
        splits={"dialogue": SplitView(shares=SHARES, sticky="user")},
        workers=[],
    )
    names = Names(snap)
    assert names.expand("dialogue") == {"a", "b"} and names.expand("a") == {"a"}
    assert names.who("dialogue", "alice", "npc-7") == "user:npc-7"
    assert names.who("dialogue", "alice", None) == "key:alice" and names.who("a", "alice", "u") is None
    assert names.resolve("dialogue", "user:npc-7") == pick("dialogue", SHARES, "user:npc-7")
    with pytest.raises(ModelNotFound) as raised:
        names.resolve("dialog")
    assert "dialogue" in raised.value.message  # listed among what exists


def test_a_keys_scope_narrows_a_split_to_the_models_it_may_use() -> None:
    snap = Snapshot(
        epoch="e",
        seq=1,
        models={"a": ModelView(), "b": ModelView()},
        aliases={},
        splits={"dialogue": SplitView(shares=SHARES)},
        workers=[],
    )
    names = Names(snap)
    assert {names.resolve("dialogue", f"key:k{i}", within={"b"}) for i in range(50)} == {"b"}
    # A scope with none of the split's models changes nothing: the scope check refuses it.
    assert {names.resolve("dialogue", f"key:k{i}", within={"c"}) for i in range(50)} == {"a", "b"}
