from __future__ import annotations

import pytest

from ssw.loader.decide.tiers import Choice, Sleeper, Victim, choose, freed, over_budget, prewarm_order, ram_budget

GB = 10**9


def victim(
    enabled: bool = True,
    weights: float = 4,
    ram: float = 2,
    cold: float | None = 40.0,
    wake: dict[int, float] | None = None,
) -> Victim:
    return Victim(enabled, int(weights * GB), int(ram * GB), cold, wake or {})


@pytest.mark.parametrize(
    ("case", "v", "budget_gb", "tier"),
    [
        ("sleep mode off: stopped", victim(enabled=False), 100, "stop"),
        ("weights fit the budget: level 1", victim(), 100, "sleep1"),
        ("exactly fits: level 1", victim(weights=4, ram=2), 6, "sleep1"),
        ("weights do not fit: level 2", victim(weights=40), 10, "sleep2"),
        ("not even the process fits: stopped", victim(weights=40, ram=12), 10, "stop"),
        ("level 1 measured slower than a cold start: level 2", victim(cold=5, wake={1: 6.0}), 100, "sleep2"),
        ("both measured slower: stopped", victim(cold=5, wake={1: 6.0, 2: 9.0}), 100, "stop"),
        ("wakes measured quicker: level 1", victim(cold=30, wake={1: 0.8, 2: 3.0}), 100, "sleep1"),
        ("nothing measured: a wake is assumed to pay", victim(cold=None), 100, "sleep1"),
        ("no budget at all: stopped", victim(ram=0.5), 0, "stop"),
    ],
)
def test_how_a_victim_gives_back_its_gpu(case: str, v: Victim, budget_gb: float, tier: str) -> None:
    choice = choose(v, int(budget_gb * GB))
    assert choice.tier == tier, (case, choice)
    assert choice.reason


def test_a_choice_names_its_level() -> None:
    assert [Choice(t, "").level for t in ("sleep1", "sleep2", "stop")] == [1, 2, 0]


def test_the_reason_says_what_did_not_fit() -> None:
    choice = choose(victim(weights=40, ram=2), 10 * GB)
    assert "level 1 needs 42.0 GB of host memory, the budget is 10.0 GB" in choice.reason


@pytest.mark.parametrize(
    ("sleepers", "budget", "stopped"),
    [
        ([], 10, []),
        ([Sleeper("a", 4, 1.0), Sleeper("b", 4, 2.0)], 10, []),
        ([Sleeper("a", 4, 1.0), Sleeper("b", 4, 2.0), Sleeper("c", 4, 3.0)], 10, ["a"]),
        ([Sleeper("c", 4, 3.0), Sleeper("a", 4, 1.0), Sleeper("b", 4, 2.0)], 4, ["a", "b"]),
        ([Sleeper("new", 9, 5.0), Sleeper("old", 2, 1.0)], 9, ["old"]),
        ([Sleeper("a", 4, 1.0)], 0, ["a"]),
        ([Sleeper("pin", 4, 1.0, pinned=True), Sleeper("b", 4, 2.0), Sleeper("c", 4, 3.0)], 10, ["b"]),
        ([Sleeper("pin", 4, 1.0, pinned=True)], 0, []),
    ],
)
def test_least_recently_used_sleepers_go_first_when_host_memory_runs_short(
    sleepers: list[Sleeper], budget: int, stopped: list[str]
) -> None:
    assert over_budget(sleepers, budget) == stopped


@pytest.mark.parametrize(
    ("before", "now", "residual", "ok"),
    [
        (30 * GB, 0, GB, True),
        (30 * GB, GB, GB, True),  # the CUDA context stays
        (30 * GB, 2 * GB, GB, True),  # a tenth of what it held
        (30 * GB, 4 * GB, GB, False),
        (30 * GB, 30 * GB, GB, False),  # nothing came free (vLLM issue #32714)
        (2 * GB, int(1.5 * GB), GB, False),
    ],
)
def test_a_sleep_counts_as_freeing_the_gpu_only_when_the_memory_shows_free(
    before: int, now: int, residual: int, ok: bool
) -> None:
    assert freed(before, now, residual) is ok


def test_the_budget_is_configured_or_a_fraction_of_host_memory() -> None:
    assert ram_budget(12.5, 0.5, 64 * GB) == int(12.5 * GB)
    assert ram_budget(None, 0.5, 64 * GB) == 32 * GB
    assert ram_budget(0, 0.5, 64 * GB) == 0


def test_prewarm_takes_the_most_requested_models_not_yet_up() -> None:
    served = {"a": 3, "b": 9, "c": 3, "d": 0, "gone": 50}
    assert prewarm_order(served, {"a", "b", "c", "d"}) == ["b", "a", "c"]
    assert prewarm_order(served, {"a"}) == ["a"]
    assert prewarm_order({}, {"a"}) == []
