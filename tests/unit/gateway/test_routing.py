"""Which worker of a pool serves the next request."""

from __future__ import annotations

from ssw.gateway.routing import RoundRobin, least_outstanding


def test_round_robin_rotates_and_gives_failover_order() -> None:
    rr = RoundRobin()
    pool = ["a", "b", "c"]
    assert [rr.order("m", pool) for _ in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]
    assert rr.order("other", pool)[0] == "a"
    assert rr.order("m", []) == []


def test_least_outstanding_takes_the_idlest_and_rotates_ties() -> None:
    rr = RoundRobin()
    busy = {"a": 3, "b": 0, "c": 0}
    orders = [least_outstanding(["a", "b", "c"], busy.__getitem__, rr, "m") for _ in range(3)]
    assert {order[0] for order in orders} == {"b", "c"}  # the idle ones share the load
    assert all(order[-1] == "a" for order in orders)  # the busy one is only the last resort
