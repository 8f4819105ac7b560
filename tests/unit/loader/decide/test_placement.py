"""Placement and eviction (pure decisions over devices and residents), by table."""

from __future__ import annotations

import pytest

from ssw.errors import NoCapacity, SwapDeferred
from ssw.loader.decide.placement import DeviceView, Policy, Resident, place
from ssw.loader.decide.vram import VramNeed

GB = 10**9


def need(gb: float, overhead: float = 0.0, source: str = "estimate") -> VramNeed:
    return VramNeed(int(gb * GB), int(overhead * GB), None, source)


def dev(index: int, total: float, used: float = 0, pending: float = 0) -> DeviceView:
    return DeviceView(index, int(total * GB), int(used * GB), int(pending * GB))


def res(unit: str, gpu: int, held: float, last_used: float, evictable: bool = True, cost: float = 30) -> Resident:
    return Resident(unit, (gpu,), int(held * GB), last_used, evictable, cost)


@pytest.mark.parametrize(
    ("gb", "devices", "policy", "chosen"),
    [
        (10, [dev(0, 48), dev(1, 48)], "spread", 0),  # a tie goes to the lowest index
        (10, [dev(0, 48, used=30), dev(1, 48, used=10)], "spread", 1),  # most free wins
        (10, [dev(0, 48, used=5), dev(1, 48, pending=20)], "spread", 0),  # reservations in flight count
        (20, [dev(0, 48, used=20), dev(1, 48, used=30)], "spread", 0),  # memory of any process counts
        (18, [dev(0, 48, used=30)], "spread", 0),  # exactly fits
        (10, [dev(0, 48, used=30), dev(1, 48, used=10)], "pack", 0),  # best fit leaves least over
        (20, [dev(0, 48, used=30), dev(1, 48, used=10)], "pack", 1),  # ...among those that fit
    ],
)
def test_placement_policies(gb: float, devices: list[DeviceView], policy: Policy, chosen: int) -> None:
    plan = place(need(gb), devices, [], policy)
    assert plan.gpus == (chosen,) and plan.evict == () and plan.per_gpu_bytes == int(gb * GB)


def test_overhead_is_added_on_each_gpu() -> None:
    assert place(need(18.4, 0.95), [dev(0, 48)], []).per_gpu_bytes == int(18.4 * GB) + int(0.95 * GB)


def test_eviction_takes_the_least_recently_used_and_never_pinned() -> None:
    devices = [dev(0, 48, used=44), dev(1, 48, used=44)]
    residents = [
        res("pinned-old", 0, 20, last_used=1, evictable=False),
        res("a", 0, 12, last_used=5),
        res("b", 0, 12, last_used=9),
        res("c", 1, 22, last_used=3, evictable=False),
        res("d", 1, 22, last_used=8),
    ]
    plan = place(need(10), devices, residents)
    # One eviction on GPU 0 (a, the least recently used there) or on GPU 1 (d):
    # both free enough; the cheaper and then the longer idle one wins.
    assert plan.evict == ("a",) and plan.gpus == (0,)


def test_eviction_prefers_the_fewest_workers() -> None:
    devices = [dev(0, 48, used=46), dev(1, 48, used=46)]
    residents = [res("a", 0, 6, 1), res("b", 0, 6, 2), res("c", 1, 15, 9)]
    plan = place(need(12), devices, residents)
    assert plan.evict == ("c",) and plan.gpus == (1,)


def test_eviction_prefers_what_is_cheapest_to_bring_back() -> None:
    devices = [dev(0, 48, used=46), dev(1, 48, used=46)]
    residents = [res("slow", 0, 15, 1, cost=120), res("fast", 1, 15, 5, cost=20)]
    assert place(need(12), devices, residents).evict == ("fast",)


def test_lru_order_within_a_gpu_takes_several_when_needed() -> None:
    devices = [dev(0, 48, used=40)]
    residents = [res("new", 0, 10, 30), res("old", 0, 10, 10), res("mid", 0, 10, 20), res("pin", 0, 10, 1, False)]
    assert place(need(25), devices, residents).evict == ("old", "mid")


def test_starting_workers_are_not_evicted() -> None:
    devices = [dev(0, 48, used=0, pending=40)]
    with pytest.raises(NoCapacity):
        place(need(10), devices, [res("loading", 0, 40, 1, evictable=False)])


def test_too_big_for_any_gpu_is_refused_with_numbers() -> None:
    devices = [dev(0, 48, used=10), dev(1, 48, used=30)]
    residents = [res("a", 1, 20, 1)]
    with pytest.raises(NoCapacity) as err:
        place(need(60), devices, residents)
    assert "needs 60.0 GB on one GPU" in err.value.message
    assert "at most 38.0 GB can be freed (GPU 0" in err.value.message
    assert "tensor_parallel" in err.value.message


def test_tensor_parallel_splits_a_model_that_fits_no_gpu() -> None:
    devices = [dev(0, 48, used=10), dev(1, 48, used=2), dev(2, 48, used=40)]
    plan = place(need(60, overhead=1), devices, [], tensor_parallel=True)
    assert plan.gpus == (0, 1) and plan.per_gpu_bytes == int(30 * GB) + int(1 * GB)
    assert plan.tensor_parallel == 2


def test_pinned_replica_gpu_is_respected() -> None:
    devices = [dev(0, 48, used=40), dev(1, 48)]
    assert place(need(5), devices, [], allowed=[0]).gpus == (0,)
    with pytest.raises(NoCapacity):
        place(need(10), devices, [], allowed=[0])


def test_memory_of_leaving_workers_counts_as_coming_free() -> None:
    # GPU 1 holds a worker being drained (8 of 10 GB): the new one waits for it
    # rather than evicting the idle worker on GPU 0.
    devices = [dev(0, 10, used=9), DeviceView(1, 10 * GB, 8 * GB, 0, releasing=8 * GB)]
    plan = place(need(8), devices, [res("idle", 0, 9, last_used=1)])
    assert plan.gpus == (1,) and plan.evict == ()


def test_room_that_is_free_now_wins_over_room_coming_free() -> None:
    devices = [dev(0, 10, used=1), DeviceView(1, 10 * GB, 8 * GB, 0, releasing=8 * GB)]
    assert place(need(8), devices, []).gpus == (0,)


def test_evictions_count_what_leaving_workers_give_back() -> None:
    devices = [DeviceView(0, 10 * GB, 10 * GB, 0, releasing=4 * GB)]
    plan = place(need(7), devices, [res("a", 0, 3, last_used=2), res("b", 0, 3, last_used=1)])
    assert plan.evict == ("b",)  # 4 coming free + 3 from the least recently used


def test_a_refusal_counts_leaving_workers_in_what_could_be_freed() -> None:
    devices = [DeviceView(0, 10 * GB, 10 * GB, 0, releasing=4 * GB)]
    with pytest.raises(NoCapacity, match=r"at most 7\.0 GB can be freed"):
        place(need(12), devices, [res("a", 0, 3, last_used=2)])


def test_eviction_takes_the_fewest_victims_that_make_room_counting_what_a_sleeper_keeps() -> None:
    """The case seen on a host: sleepy-a (24.9 GB, sleep mode: keeps 1 GB asleep) and an
    older 1.9 GB bystander on GPU 0; loading 24.9 GB more. Least-recently-used order took
    the bystander and then sleepy-a; sleepy-a alone gives back 23.9 GB, which is enough."""
    devices = [dev(0, 48, used=24.9 + 1.9)]
    residents = [
        Resident("bystander", (0,), int(1.9 * GB), 1, True, 5),
        Resident("sleepy-a", (0,), int(24.9 * GB), 5, True, 30, keeps=int(1 * GB)),
    ]
    assert place(need(24.9), devices, residents).evict == ("sleepy-a",)
    # Where what sleepy-a keeps asleep would leave too little, both go.
    assert place(need(46), devices, residents).evict == ("bystander", "sleepy-a")


@pytest.mark.parametrize(
    ("held", "need_gb", "evicted"),
    [
        # Equal counts: the cheapest to bring back, then the longest unused.
        ({"a": (10, 1, 30), "b": (10, 2, 30), "c": (20, 3, 30)}, 18, ("c",)),
        ({"a": (10, 1, 30), "b": (10, 2, 30), "c": (10, 3, 30)}, 10, ("a",)),
        ({"a": (10, 1, 300), "b": (10, 2, 30)}, 10, ("b",)),
        # Two are needed: the pair least recently used.
        ({"a": (10, 1, 30), "b": (10, 2, 30), "c": (10, 3, 30)}, 20, ("a", "b")),
    ],
)
def test_eviction_choice_by_table(
    held: dict[str, tuple[float, float, float]], need_gb: float, evicted: tuple[str, ...]
) -> None:
    used = sum(h for h, _, _ in held.values())
    residents = [res(u, 0, h, last, cost=cost) for u, (h, last, cost) in held.items()]
    assert place(need(need_gb), [dev(0, used, used=used)], residents).evict == evicted


def young(unit: str, gpu: int, held: float, last_used: float) -> Resident:
    return Resident(unit, (gpu,), int(held * GB), last_used, True, 30, young=True)


@pytest.mark.parametrize(
    ("residents", "rank", "evicted"),
    [
        # Two models taking turns on one GPU: the one just loaded stays, the older one goes,
        # least recently used or not.
        ([young("just-ready", 0, 8, last_used=1.0), res("settled", 0, 8, last_used=5.0)], 1, ("settled",)),
        # Only a young worker could make room: a realtime request may have it.
        ([young("just-ready", 0, 8, last_used=1.0)], 0, ("just-ready",)),
        # Even then, an older one goes first.
        ([young("just-ready", 0, 8, last_used=1.0), res("settled", 0, 8, last_used=5.0)], 0, ("settled",)),
    ],
)
def test_workers_within_their_minimum_residency_give_way_only_to_urgent_loads(
    residents: list[Resident], rank: int, evicted: tuple[str, ...]
) -> None:
    plan = place(need(6), [dev(0, 20, used=16)], residents, rank=rank)
    assert plan.evict == evicted


def test_a_load_that_is_not_urgent_waits_for_a_young_workers_residency_and_says_so() -> None:
    with pytest.raises(SwapDeferred) as raised:
        place(need(6), [dev(0, 10, used=8)], [young("just-ready", 0, 8, last_used=1.0)])
    assert "became ready less than placement.min_residency_s ago" in raised.value.message


def test_nobody_waits_for_a_young_worker_whose_room_would_not_be_enough_anyway() -> None:
    with pytest.raises(NoCapacity) as raised:
        place(need(16), [dev(0, 10, used=8)], [young("just-ready", 0, 8, last_used=1.0)])
    assert not isinstance(raised.value, SwapDeferred)


REALTIME, INTERACTIVE, BATCH = 0, 1, 2


def busy(unit: str, gpu: int, held: float, last_used: float, waiters: int, rank: int | None) -> Resident:
    """A worker that ``waiters`` requests are in flight on, the most urgent of rank ``rank``."""
    return Resident(unit, (gpu,), int(held * GB), last_used, True, 30, waiters=waiters, waiter_rank=rank)


@pytest.mark.parametrize(
    ("residents", "rank", "evicted", "drained"),
    [
        # Nobody waits for the older one: it goes, however recently the busy one was used.
        ([busy("busy", 0, 8, 1.0, 3, INTERACTIVE), res("idle", 0, 8, last_used=5.0)], INTERACTIVE, ("idle",), ()),
        # Both busy: the one whose waiters are less urgent goes...
        (
            [busy("batchy", 0, 8, 9.0, 20, BATCH), busy("chatty", 0, 8, 1.0, 1, INTERACTIVE)],
            INTERACTIVE,
            ("batchy",),
            (),
        ),
        # ...and among as urgent, the one fewer wait for; it serves them first.
        (
            [busy("many", 0, 8, 1.0, 9, INTERACTIVE), busy("few", 0, 8, 9.0, 2, INTERACTIVE)],
            INTERACTIVE,
            ("few",),
            ("few",),
        ),
        # Two idle workers give way rather than one that realtime requests wait for.
        (
            [busy("npc", 0, 8, 1.0, 1, REALTIME), res("a", 0, 4, last_used=5.0), res("b", 0, 4, last_used=6.0)],
            REALTIME,
            ("a", "b"),
            (),
        ),
        # A realtime load does not wait for interactive requests: it swaps now.
        ([busy("chatty", 0, 8, 1.0, 4, INTERACTIVE)], REALTIME, ("chatty",), ()),
        # A batch victim of an interactive load: no queue served first.
        ([busy("batchy", 0, 8, 1.0, 4, BATCH)], INTERACTIVE, ("batchy",), ()),
    ],
)
def test_eviction_weighs_who_waits_for_each_candidate(
    residents: list[Resident], rank: int, evicted: tuple[str, ...], drained: tuple[str, ...]
) -> None:
    plan = place(need(8), [dev(0, 16, used=16)], residents, rank=rank)
    assert set(plan.evict) == set(evicted) and plan.drain == drained


@pytest.mark.parametrize(
    ("victim_rank", "rank"),
    [(REALTIME, INTERACTIVE), (REALTIME, BATCH), (INTERACTIVE, BATCH)],
)
def test_a_swap_under_more_urgent_requests_than_its_own_waits(victim_rank: int, rank: int) -> None:
    with pytest.raises(SwapDeferred) as raised:
        place(need(8), [dev(0, 16, used=16)], [busy("npc", 0, 16, 1.0, 2, victim_rank)], rank=rank)
    assert "npc (2 request(s) in flight, some more urgent)" in raised.value.message
    assert raised.value.status == 503


def test_a_load_waits_for_a_worker_still_starting_where_it_would_make_room_once_ready() -> None:
    coming = Resident("coming", (0,), 8 * GB, 1.0, False, 30, starting=True)
    with pytest.raises(SwapDeferred) as raised:
        place(need(6), [dev(0, 10, used=8)], [coming])
    assert "coming is still starting" in raised.value.message
    # Where even its room would not be enough, the answer is no capacity at once.
    with pytest.raises(NoCapacity) as raised:
        place(need(16), [dev(0, 10, used=8)], [coming])
    assert not isinstance(raised.value, SwapDeferred)


@pytest.mark.parametrize(
    ("devices", "residents", "gpus", "evict"),
    [
        ([dev(0, 48), dev(1, 48), dev(2, 48, used=40)], [], (0, 1), ()),  # the GPUs with room
        ([dev(0, 48, used=30), dev(1, 48), dev(2, 48)], [], (1, 2), ()),  # most free first
        # Room only by an eviction on one of them: the GPU that fits already goes first.
        ([dev(0, 48, used=40), dev(1, 48)], [res("w0", 0, 40, 1.0)], (0, 1), ("w0",)),
    ],
)
def test_a_rank_takes_its_gpus_on_a_host(
    devices: list[DeviceView], residents: list[Resident], gpus: tuple[int, ...], evict: tuple[str, ...]
) -> None:
    plan = place(need(20), devices, residents, width=2)
    assert plan.gpus == gpus and plan.evict == evict and plan.per_gpu_bytes == 20 * GB


def test_a_rank_without_enough_gpus_is_no_capacity_with_the_numbers() -> None:
    devices = [dev(0, 48), dev(1, 48, used=40)]
    with pytest.raises(NoCapacity, match=r"a rank needs 2 GPUs with 20.0 GB each \(estimate\); only 1 of 2"):
        place(need(20), devices, [res("pinned", 1, 40, 1.0, evictable=False)], width=2)
