from __future__ import annotations

import pytest

from ssw.errors import BadRequest
from ssw.gateway.routing import RoundRobin, least_outstanding
from ssw.gateway.waitqueue import QueueFull, WaitQueue, parse_priority


async def test_waiters_are_released_in_priority_order_first_come_first_served_within_a_tier() -> None:
    q = WaitQueue(limit=10)
    arrivals = ["batch", "interactive", "realtime", "batch", "realtime", "interactive"]
    waiters = [q.add("m", p, 5) for p in arrivals]
    released = q.release("m")
    assert [(w.priority, waiters.index(w)) for w in released] == [
        ("realtime", 2),
        ("realtime", 4),
        ("interactive", 1),
        ("interactive", 5),
        ("batch", 0),
        ("batch", 3),
    ]
    assert all(w.future.done() and w.future.result() is None for w in waiters)
    assert q.depth("m") == 0 and q.release("m") == []


async def test_a_full_queue_refuses_with_429_unless_a_more_urgent_request_displaces_one() -> None:
    q = WaitQueue(limit=3)
    first, second, third = (q.add("m", p, 7) for p in ("batch", "batch", "interactive"))
    with pytest.raises(QueueFull) as err:
        q.add("m", "batch", 7)
    assert err.value.status == 429 and err.value.retry_after_s == 7
    urgent = q.add("m", "realtime", 7)
    # The newest of the least urgent gave way.
    assert isinstance(second.future.exception(), QueueFull)
    assert not first.future.done() and q.depth("m") == 3
    assert q.release("m")[0] is urgent
    assert first.future.done() and third.future.done()


async def test_failing_a_load_fails_every_waiter_and_queues_are_per_model() -> None:
    q = WaitQueue(limit=2)
    a, b = q.add("m", "batch", 1), q.add("other", "batch", 1)
    q.fail("m", RuntimeError("load failed"))
    assert isinstance(a.future.exception(), RuntimeError)
    assert not b.future.done() and q.models() == ["other"]
    q.discard(b)
    assert q.depth("other") == 0


@pytest.mark.parametrize(
    ("header", "tier"), [(None, "interactive"), ("", "interactive"), ("Realtime", "realtime"), (" batch ", "batch")]
)
def test_priority_header(header: str | None, tier: str) -> None:
    assert parse_priority(header) == tier


def test_unknown_priority_is_a_400() -> None:
    with pytest.raises(BadRequest):
        parse_priority("urgent")


def test_least_outstanding_prefers_idle_replicas_and_rotates_ties() -> None:
    rr = RoundRobin()
    load = {"a": 3, "b": 0, "c": 0}
    assert least_outstanding(["a", "b", "c"], load.get, rr, "m") == ["b", "c", "a"]
    assert least_outstanding(["a", "b", "c"], load.get, rr, "m") == ["b", "c", "a"]
    assert least_outstanding(["a", "b", "c"], load.get, rr, "m") == ["c", "b", "a"]


async def test_a_ready_on_another_host_releases_all_but_the_hops_this_host_serves() -> None:
    q = WaitQueue(10)
    client = q.add("m", "interactive", 5)
    hop = q.add("m", "interactive", 5, here_only=True)
    assert q.release("m", here=False) == [client]
    assert client.future.done() and not hop.future.done() and q.depth("m") == 1
    assert q.release("m") == [hop] and q.depth("m") == 0
