"""The worker table: the one place worker states change."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ssw.common.states import IllegalTransition, WorkerState
from ssw.loader.workers.table import Worker, WorkerTable, load_phases


@pytest.mark.parametrize(
    ("marks", "expected"),
    [
        ({}, None),  # adopted: this loader did not see the load
        ({"requested": 10.0}, {}),
        (
            {"requested": 10.0, "placed": 10.5, "evicted": 14.5, "unit_started": 14.6},
            {"placement": 0.5, "eviction": 4.0, "unit_start": 0.1},
        ),
        (
            {"requested": 10.0, "placed": 10.5, "evicted": 10.5, "unit_started": 10.6, "bound": 18.6, "healthy": 40.0},
            {
                "placement": 0.5,
                "eviction": 0.0,
                "unit_start": 0.1,
                "process_up": 8.0,
                "engine_ready": 21.4,
                "total": 30.0,
            },
        ),
    ],
)
def test_load_phases_follow_the_marks(marks: dict[str, float], expected: dict[str, float] | None) -> None:
    assert load_phases(marks) == expected


def worker(state: WorkerState = WorkerState.STARTING) -> Worker:
    return Worker(
        model="m",
        replica=1,
        unit="ssw-worker@m.service",
        socket=Path("/run/ssw/workers/m-0/http.sock"),
        gpus=(0,),
        budget_bytes=1,
        state=state,
    )


async def test_each_move_is_applied_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    changes: list[int] = []
    table = WorkerTable(lambda: changes.append(1))
    w = worker()
    table.add(w, "placed")
    table.move(w, WorkerState.READY, "healthy")
    table.move(w, WorkerState.READY, "healthy again")  # no change, not logged
    assert w.state is WorkerState.READY and w.state_reason == "healthy"
    assert caplog.text.count("ssw-worker@m.service: starting -> ready (healthy)") == 1
    assert "healthy again" not in caplog.text
    assert len(changes) == 2


async def test_an_impossible_move_is_refused_loudly(caplog: pytest.LogCaptureFixture) -> None:
    table = WorkerTable(lambda: None)
    w = worker(WorkerState.DRAINING)
    table.add(w, "adopted")
    with pytest.raises(IllegalTransition):
        table.move(w, WorkerState.READY, "oops")
    assert w.state is WorkerState.DRAINING
    assert "BUG: ssw-worker@m.service: refused draining -> ready" in caplog.text


async def test_a_terminal_move_takes_the_worker_out_and_says_why() -> None:
    left: list[tuple[WorkerState, WorkerState]] = []
    table = WorkerTable(lambda: None)
    table.on_leave = lambda w, before, after: left.append((before, after))
    w = worker(WorkerState.READY)
    table.add(w, "adopted")
    table.move(w, WorkerState.FAILED, "the unit went failed/failed unexpectedly")
    assert table.get(w.unit) is None and len(table) == 0
    assert w.done.result() == "the unit went failed/failed unexpectedly"
    assert left == [(WorkerState.READY, WorkerState.FAILED)]
    table.move(w, WorkerState.READY, "late news")  # about a worker that left: ignored
    assert w.state is WorkerState.FAILED


async def test_leaving_workers_are_found_by_gpu() -> None:
    table = WorkerTable(lambda: None)
    a, b = worker(WorkerState.DRAINING), worker(WorkerState.READY)
    b.unit, b.gpus = "ssw-worker@m:2.service", (1,)
    table.add(a, "x")
    table.add(b, "y")
    assert table.leaving_on((0,)) == [a] and table.leaving_on((1,)) == []
    assert table.counts()["draining"] == 1 and table.counts()["ready"] == 1


async def test_released_means_this_leave_gave_its_memory_back_not_an_earlier_one() -> None:
    table = WorkerTable(lambda: None)
    w = worker(WorkerState.READY)
    table.add(w, "test")
    for state, released in (
        (WorkerState.DRAINING, False),
        (WorkerState.SLEEPING, True),
        (WorkerState.WAKING, True),
        (WorkerState.READY, True),
        (WorkerState.DRAINING, False),  # drained again: the earlier sleep's release does not count
        (WorkerState.STOPPING, False),
        (WorkerState.GONE, True),
    ):
        table.move(w, state)
        assert w.released.is_set() is released, state
