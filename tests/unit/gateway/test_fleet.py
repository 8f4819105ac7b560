"""Which host of a fleet loads a model that is ready nowhere (pure), by table."""

from __future__ import annotations

import pytest

from ssw.gateway.fleet import HostOption, choose_host

GB = 10**9


def opt(host: str, free: float, load_s: float | None = 30, victims: int = 0, loading: bool = False) -> HostOption:
    return HostOption(host, loading, int(free * GB), load_s, victims)


@pytest.mark.parametrize(
    ("options", "chosen"),
    [
        ([], None),
        ([opt("a", 10)], "a"),
        ([opt("a", 10), opt("b", 30)], "b"),  # the most free VRAM after the load and its evictions
        ([opt("a", 30, load_s=40), opt("b", 30, load_s=20)], "b"),  # then the fastest measured load
        ([opt("a", 30, load_s=None), opt("b", 30, load_s=90)], "b"),  # a measured load beats a guess
        ([opt("a", 30, victims=2), opt("b", 30, victims=1)], "b"),  # then the fewest victims
        ([opt("b", 30), opt("a", 30)], "a"),  # then the name: every gateway decides alike
        ([opt("a", 40), opt("b", 1, loading=True)], "b"),  # where it already loads, above all
    ],
)
def test_choose_host(options: list[HostOption], chosen: str | None) -> None:
    assert choose_host(options) == chosen
