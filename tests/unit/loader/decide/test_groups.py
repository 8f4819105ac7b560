"""Choosing the hosts of a model across hosts, and its master port (pure), by table."""

from __future__ import annotations

import random

import pytest

from ssw.errors import NoCapacity
from ssw.loader.decide.groups import MemberOption, choose_members, choose_port

GB = 10**9


def host(name: str, free: float | None = 40, victims: int = 0, address: str | None = "10.0.0.9",
         has_model: bool = True) -> MemberOption:  # fmt: skip
    return MemberOption(name, address, has_model, int(free * GB) if free is not None else None, victims)


@pytest.mark.parametrize(
    ("wanted", "options", "chosen"),
    [
        (1, [host("b"), host("c")], ["b"]),  # a tie goes by name: every head decides alike
        (1, [host("b", free=10), host("c", free=30)], ["c"]),  # the most memory left
        (1, [host("b", free=40, victims=1), host("c", free=5)], ["c"]),  # the fewest evictions first
        (2, [host("b"), host("c"), host("d", free=1)], ["b", "c"]),
        (1, [host("b", free=None), host("c")], ["c"]),  # no room there
        (1, [host("b", has_model=False), host("c")], ["c"]),  # not on its disk
        (1, [host("b", address=None), host("c")], ["c"]),  # not set up for ranks
    ],
)
def test_members_are_the_hosts_with_room_fewest_evictions_first(
    wanted: int, options: list[MemberOption], chosen: list[str]
) -> None:
    assert [o.host for o in choose_members("big", wanted, options)] == chosen


def test_too_few_hosts_is_no_capacity_saying_what_each_lacks() -> None:
    options = [host("b", free=None), host("c", has_model=False), host("d", address=None)]
    with pytest.raises(NoCapacity) as caught:
        choose_members("big", 1, options)
    assert caught.value.message == (
        "big spans 2 hosts, but only 0 other host(s) can take a rank now (b: no room for a rank; "
        "c: no big on disk; d: no rank address (fleet.listen))"
    )
    with pytest.raises(NoCapacity, match="no other host is in the fleet"):
        choose_members("big", 1, [])


def test_a_new_start_never_takes_a_port_an_earlier_group_used() -> None:
    rng = random.Random(7)
    used = list(range(29500, 29509))
    assert choose_port((29500, 29509), used, rng) == 29509
    ports = {choose_port((29500, 29999), used, rng) for _ in range(200)}
    assert ports.isdisjoint(used) and all(29500 <= p <= 29999 for p in ports)
    with pytest.raises(NoCapacity, match=r"every port of fleet\.rank_ports 29500-29502"):
        choose_port((29500, 29502), [29500, 29501, 29502], rng)
