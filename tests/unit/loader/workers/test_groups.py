"""A model across hosts as one, on a fake bus and an in-memory board: a member starts
its headless rank of a group naming it, counts it ready with the group, stops it when
its start is over and ends the group when the rank dies; a head forms its group from
the hosts with room, and breaks (to load again) when its group ends or a member
drops out of the fleet."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from ssw.common.contract import GroupRecord, HostRecord, ModelView, Preview
from ssw.common.states import WorkerState
from ssw.errors import LoadFailed, NoCapacity
from ssw.loader.group_board import BoardUnavailable
from ssw.loader.models.catalog import Catalog
from ssw.loader.models.registry import Registry
from ssw.loader.models.spans import make_span
from ssw.loader.systemd.engine import RANK_PROGRAM
from ssw.loader.workers.groups import Groups
from ssw.loader.workers.supervisor import Supervisor
from ssw.loader.workers.table import Worker
from tests.unit.loader.workers.conftest import SupervisorFactory
from tests.unit.loader.workers.fakes import FakeBus, spec

FLEET = {
    "redis_url": "redis://127.0.0.1:1/0",
    "host": "hosta",
    "advertise_url": "http://10.0.0.2:8443",
    "listen": {"host": "10.0.0.2", "port": 8443},
    "insecure": True,
    "heartbeat_s": 0.01,
}
BIG = spec("big", vram_gb=4, span=make_span(2, None, None, None))


class FakeBoard:
    def __init__(self) -> None:
        self.records: dict[str, GroupRecord] = {}
        self.host_records: dict[str, HostRecord] = {}
        self.ended: list[str] = []

    async def groups(self) -> dict[str, GroupRecord]:
        return dict(self.records)

    async def get(self, model: str) -> GroupRecord | None:
        return self.records.get(model)

    async def hosts(self) -> dict[str, HostRecord]:
        return dict(self.host_records)

    async def claim(self, record: GroupRecord) -> GroupRecord | None:
        standing = self.records.get(record.model)
        if standing is None:
            self.records[record.model] = record
        return standing

    async def _same(self, record: GroupRecord) -> bool:
        current = self.records.get(record.model)
        return current is not None and current.id == record.id

    async def take_over(self, stale: GroupRecord, record: GroupRecord) -> bool:
        if not await self._same(stale):
            return False
        self.records[record.model] = record
        return True

    async def update(self, record: GroupRecord) -> bool:
        return await self.take_over(record, record)

    async def renew(self, record: GroupRecord) -> bool:
        return await self._same(record)

    async def end(self, record: GroupRecord, reason: str, unloaded: bool = False) -> bool:
        if not await self._same(record):
            return False
        self.ended.append(reason)
        changes = {"state": "ending", "reason": reason, "unloaded": unloaded}
        self.records[record.model] = record.model_copy(update=changes)
        return True

    async def delete(self, record: GroupRecord) -> bool:
        if not await self._same(record):
            return False
        del self.records[record.model]
        return True

    async def close(self) -> None:
        return None


def host(name: str, room: bool = True, address: str = "10.0.0.3") -> HostRecord:
    return HostRecord(
        host=name,
        url=f"http://{address}:8443",
        epoch="e",
        at=time.time(),
        gpus=[],
        models={"big": ModelView()},
        aliases={},
        workers=[],
        previews={"big": Preview(free_after_bytes=10**9, victims=0) if room else None},
        rank_address=address,
    )


def group(head: str = "hostb", state: str = "starting", group_id: str = "00112233445566aa") -> GroupRecord:
    members = [{"host": head, "rank": 0, "address": "10.0.0.3"}, {"host": "hosta", "rank": 1, "address": "10.0.0.2"}]
    if head == "hosta":
        members = [
            {"host": "hosta", "rank": 0, "address": "10.0.0.2"},
            {"host": "hostb", "rank": 1, "address": "10.0.0.3"},
        ]
    return GroupRecord.model_validate(
        {
            "id": group_id,
            "model": "big",
            "head": head,
            "master_addr": members[0]["address"],
            "master_port": 29600,
            "members": members,
            "state": state,
            "at": time.time(),
        }
    )


@pytest.fixture
def fleet_supervisor(make_supervisor: SupervisorFactory) -> tuple[Supervisor, Groups, FakeBoard, list[Any]]:
    sup = make_supervisor(fleet=FLEET)
    sup.catalog.registry = Registry(models={"big": BIG}, aliases={})  # type: ignore[misc]
    assert isinstance(sup.catalog, Catalog) and sup.groups is not None
    board = FakeBoard()
    sup.groups.board = board  # type: ignore[assignment]
    lost: list[Any] = []
    sup.groups.lost = lambda worker, why: lost.append((worker.unit, why))
    return sup, sup.groups, board, lost


async def until(check: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def two_hosts() -> dict[str, HostRecord]:
    """This host (hosta) and hostb, both with room for a rank."""
    return {"hosta": host("hosta", address="10.0.0.2"), "hostb": host("hostb")}


async def ready_rank(sup: Supervisor, groups: Groups, board: FakeBoard) -> Worker:
    """This host running its rank of a ready group that hostb heads, its start done."""
    bus: FakeBus = sup.systemd  # type: ignore[assignment]
    board.host_records = two_hosts()
    board.records["big"] = group(state="ready")
    await groups.turn()
    await until(lambda: bool(bus.started))
    await groups.turn()
    await until(lambda: not groups._starting)  # its start has seen it ready
    rank: Worker = sup.table.get(bus.started[0].name)  # type: ignore[assignment]
    assert rank.state is WorkerState.READY
    return rank


async def test_a_member_runs_its_rank_with_the_group_and_stops_it_when_its_start_is_over(
    fleet_supervisor: tuple[Supervisor, Groups, FakeBoard, list[Any]],
) -> None:
    sup, groups, board, _ = fleet_supervisor
    bus: FakeBus = sup.systemd  # type: ignore[assignment]
    board.host_records = two_hosts()
    board.records["big"] = group()
    await groups.turn()
    await until(lambda: bool(bus.started))
    unit = bus.started[0]
    assert unit.argv[1] == str(RANK_PROGRAM) and "--node-rank" in unit.argv and unit.env["SSW_RANK"] == "1"
    rank: Worker = sup.table.get(unit.name)  # type: ignore[assignment]
    assert rank.headless and rank.fixed and rank.state is WorkerState.STARTING
    assert sup.table.live("big") == []  # nothing here serves it
    board.records["big"] = group(state="ready")
    await groups.turn()
    assert rank.state is WorkerState.READY and sup.table.ready("big") == []
    # A newer start (another id): this one is over, and its rank goes.
    board.records["big"] = group(group_id="99887766554433ff")
    await groups.turn()
    await until(rank.done.done)
    assert bus.stopped[0] == unit.name and rank.retire_cause == "group" and rank.state is WorkerState.GONE
    # ...and the newer start's rank is started in its place.
    await until(lambda: len(bus.started) == 2)
    assert bus.started[1].env["SSW_GROUP"] == "99887766554433ff"


async def test_a_rank_that_dies_ends_its_group(
    fleet_supervisor: tuple[Supervisor, Groups, FakeBoard, list[Any]],
) -> None:
    sup, groups, board, _ = fleet_supervisor
    bus: FakeBus = sup.systemd  # type: ignore[assignment]
    rank = await ready_rank(sup, groups, board)
    bus.emit(rank.unit, "failed", "failed")
    await until(lambda: bool(board.ended))
    assert board.ended[0].startswith("rank 1 on hosta ended: the unit went failed/failed unexpectedly")
    assert sup.loads.get("big").state.value == "idle"  # a member does not load it itself


async def test_a_head_forms_its_group_from_the_hosts_with_room(
    fleet_supervisor: tuple[Supervisor, Groups, FakeBoard, list[Any]],
) -> None:
    _, groups, board, _ = fleet_supervisor
    board.host_records = {
        "hosta": host("hosta", address="10.0.0.2"),
        "hostb": host("hostb"),
        "hostc": host("hostc", room=False),
    }
    part = await groups.form(BIG)
    record = board.records["big"]
    assert part.rank == 0 and part.group == record and record.head == "hosta"
    assert [(m.host, m.rank) for m in record.members] == [("hosta", 0), ("hostb", 1)]
    assert 29500 <= record.master_port <= 29999
    # Another host heading it, alive: this one may not.
    board.records["big"] = group(head="hostb")
    with pytest.raises(LoadFailed, match="headed by hostb"):
        await groups.form(BIG)
    # Too few hosts with room, even after waiting a few heartbeats.
    board.records.clear()
    board.host_records = {"hosta": host("hosta", address="10.0.0.2"), "hostb": host("hostb", room=False)}
    with pytest.raises(NoCapacity, match="hostb: no room for a rank"):
        await groups.form(BIG)


async def test_a_head_breaks_when_its_group_ends_or_a_member_drops_out(
    fleet_supervisor: tuple[Supervisor, Groups, FakeBoard, list[Any]],
) -> None:
    sup, groups, board, lost = fleet_supervisor
    for why in ("ending", "dropped"):
        board.host_records = two_hosts()
        part = await groups.form(BIG)
        head = Worker(
            model="big",
            replica=1,
            unit=f"ssw-worker@big-{why}.service",
            socket=sup.cfg.workers.socket_dir / why,
            gpus=(0,),
            budget_bytes=10**9,
            state=WorkerState.READY,
            part=part,
            unit_seen_active=True,
        )
        sup.table.add(head, "ready")
        if why == "ending":
            await board.end(board.records["big"], "rank 1 on hostb ended: killed")
        else:
            del board.host_records["hostb"]
        await groups.turn()
        assert head.state is WorkerState.STOPPING and head.retire_cause == "group"
        expected = "rank 1 on hostb ended: killed" if why == "ending" else "host hostb dropped out of the fleet"
        assert lost[-1] == (head.unit, f"{head.unit}: its group broke: {expected}")
        await until(lambda h=head: sup.table.get(h.unit) is None)
        await until(lambda: "big" not in board.records)  # the head takes its record with it


async def test_a_host_cut_off_from_the_fleet_stops_its_ranks(
    fleet_supervisor: tuple[Supervisor, Groups, FakeBoard, list[Any]],
) -> None:
    sup, groups, board, _ = fleet_supervisor
    rank = await ready_rank(sup, groups, board)

    async def unreachable() -> dict[str, GroupRecord]:
        raise BoardUnavailable("connection refused")

    board.groups = unreachable  # type: ignore[method-assign]
    sup.cfg.fleet.__dict__["ttl_s"] = 0.05  # past it at once
    runner = asyncio.ensure_future(groups.run())
    try:
        await until(rank.done.done)
    finally:
        runner.cancel()
    assert rank.state is WorkerState.GONE and rank.retire_cause == "group"
    changes = [e.text for e in sup.parts.lifecycle.events() if e.unit == rank.unit]
    assert any("its group cannot be kept: the fleet's Redis cannot be reached" in text for text in changes), changes


async def test_an_unload_on_a_member_unloads_the_group_head_first(
    fleet_supervisor: tuple[Supervisor, Groups, FakeBoard, list[Any]],
) -> None:
    sup, groups, board, _ = fleet_supervisor
    bus: FakeBus = sup.systemd  # type: ignore[assignment]
    rank = await ready_rank(sup, groups, board)
    unloading = asyncio.ensure_future(sup.unload("big"))
    await until(lambda: bool(board.ended))
    ended = board.records["big"]
    assert ended.state == "ending" and ended.unloaded and ended.reason == "unload requested on hosta"
    assert not unloading.done() and bus.stopped == []  # the rank waits for its head to go
    del board.records["big"]  # the head stopped and took the record with it
    await groups.turn()
    assert await asyncio.wait_for(unloading, 5) == [rank.unit]
    assert bus.stopped == [rank.unit]
