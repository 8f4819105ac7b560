"""plan_start and plan_wake, by table: where a replica starts and who gives way,
under which unit name; whether a sleeper can wake where it sleeps."""

from __future__ import annotations

import pytest

from ssw.errors import NoCapacity
from ssw.loader.decide.placement import DeviceView, Resident
from ssw.loader.decide.plan import StartPlan, plan_start, plan_wake
from ssw.loader.decide.vram import GB, VramNeed


def dev(index: int, total: float, used: float = 0) -> DeviceView:
    return DeviceView(index, int(total * GB), int(used * GB), 0)


def res(unit: str, gpu: int, held: float, last_used: float = 0.0, evictable: bool = True) -> Resident:
    return Resident(unit, (gpu,), int(held * GB), last_used, evictable, 30.0)


NEED_6 = VramNeed(6 * GB, 0, None, "models.yaml")
A1 = "ssw-worker@a.service"
A2 = "ssw-worker@a:2.service"
A3 = "ssw-worker@a:3.service"


@pytest.mark.parametrize(
    ("replica", "replicas", "devices", "residents", "taken", "expected"),
    [
        # room now on the emptier GPU (spread), the replica's own unit name
        (1, 1, [dev(0, 10, 5), dev(1, 10)], [], set(), StartPlan(A1, (1,), (), 6 * GB)),
        # replica 2 of 2
        (2, 2, [dev(0, 10)], [], set(), StartPlan(A2, (0,), (), 6 * GB)),
        # its name still loaded in systemd (a unit stopping): the first number past the replicas
        (1, 2, [dev(0, 10)], [], {A1}, StartPlan(A3, (0,), (), 6 * GB)),
        # no room: the least recently used of two gives way
        (
            1,
            1,
            [dev(0, 10, 8)],
            [res("old", 0, 4, last_used=1.0), res("new", 0, 4, last_used=2.0)],
            set(),
            StartPlan(A1, (0,), ("old",), 6 * GB),
        ),
    ],
)
def test_plan_start(
    replica: int,
    replicas: int,
    devices: list[DeviceView],
    residents: list[Resident],
    taken: set[str],
    expected: StartPlan,
) -> None:
    assert plan_start("a", replica, replicas, NEED_6, devices, residents, "spread", None, False, taken) == expected


def test_a_start_that_fits_nowhere_names_the_model() -> None:
    with pytest.raises(NoCapacity) as raised:
        plan_start(
            "a", 1, 1, NEED_6, [dev(0, 10, 8)], [res("pinned", 0, 8, evictable=False)], "spread", None, False, ()
        )
    assert raised.value.message.startswith("a: needs 6.0 GB on one GPU (models.yaml)")


@pytest.mark.parametrize(
    ("need_gb", "gpus", "devices", "residents", "evict"),
    [
        (4, (0,), [dev(0, 10, 2)], [], ()),  # room where it sleeps
        (4, (0,), [dev(0, 10, 8)], [res("idle", 0, 6)], ("idle",)),  # someone gives way there
    ],
)
def test_plan_wake(
    need_gb: float, gpus: tuple[int, ...], devices: list[DeviceView], residents: list[Resident], evict: tuple[str, ...]
) -> None:
    plan = plan_wake(int(need_gb * GB), gpus, devices, residents, "spread")
    assert plan.gpus == gpus[:1] and plan.evict == evict


def test_a_split_sleeper_wakes_only_where_every_other_gpu_has_room() -> None:
    with pytest.raises(NoCapacity) as raised:
        plan_wake(4 * GB, (0, 1), [dev(0, 10), dev(1, 10, 9)], [], "spread")
    assert raised.value.message == "GPU 1 has 1.0 GB free"
