"""A load's or wake's progress (pure): its phase, since when, and the measured median."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssw.common.contract import LoadProgress
from ssw.common.states import WorkerState
from ssw.loader.workers.progress import progress
from ssw.loader.workers.table import Worker


def worker(state: WorkerState, marks: dict[str, float], started: float = 100.0, since: float = 100.0) -> Worker:
    w = Worker("m", 1, "u", Path("/x"), (0,), 1, state, started_at=started, state_since=since)
    w.marks = marks
    w.sleep_level = 1
    return w


@pytest.mark.parametrize(
    ("marks", "phase"),
    [
        ({"requested": 99.0, "placed": 100.0}, "eviction"),
        ({"requested": 99.0, "placed": 100.0, "evicted": 101.0}, "unit_start"),
        ({"requested": 99.0, "placed": 100.0, "evicted": 101.0, "unit_started": 102.0}, "process_up"),
        ({"requested": 99.0, "placed": 100.0, "evicted": 101.0, "unit_started": 102.0, "bound": 103}, "engine_ready"),
    ],
)
async def test_a_starting_worker_is_in_the_phase_after_its_last_mark(marks: dict[str, float], phase: str) -> None:
    found = progress([worker(WorkerState.STARTING, marks)], 99.0, 20.0, lambda level: None)
    assert found == LoadProgress(kind="load", phase=phase, started=100.0, expected_s=20.0)


async def test_a_wake_counts_from_its_own_start_not_the_first_loads_marks() -> None:
    old = {"requested": 1.0, "placed": 2.0, "evicted": 3.0, "unit_started": 4.0, "bound": 5.0, "healthy": 6.0}
    waiting = worker(WorkerState.WAKING, {**old, "placed": 500.0}, since=500.0)
    assert progress([waiting], None, 20.0, lambda level: 2.0 * level) == LoadProgress(
        kind="wake", phase="eviction", started=500.0, expected_s=2.0
    )
    waking = worker(WorkerState.WAKING, {**old, "placed": 500.0, "evicted": 501.0}, since=500.0)
    assert progress([waking], None, 20.0, lambda level: None).phase == "waking"  # type: ignore[union-attr]


async def test_placement_before_any_worker_and_nothing_when_idle() -> None:
    assert progress([], 42.0, None, lambda level: None) == LoadProgress(
        kind="load", phase="placement", started=42.0, expected_s=None
    )
    assert progress([worker(WorkerState.READY, {})], None, 20.0, lambda level: None) is None


def test_eta_counts_down_to_zero_and_never_below() -> None:
    p = LoadProgress(kind="load", phase="engine_ready", started=100.0, expected_s=20.0)
    assert p.describe(105.0) == {
        "kind": "load",
        "phase": "engine_ready",
        "elapsed_s": 5.0,
        "expected_s": 20.0,
        "eta_s": 15.0,
    }
    assert p.eta_s(130.0) == 0.0
    assert LoadProgress(kind="load", phase="placement", started=1.0).eta_s(5.0) is None
