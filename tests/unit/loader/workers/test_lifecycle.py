"""The lifecycle: each change the table and the load book apply, told once, as an
event for the status page and as a Change for the metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ssw.common.states import LoadState, WorkerState
from ssw.loader.metrics import LoaderMetrics
from ssw.loader.workers.lifecycle import EVENTS_KEPT, Change, Lifecycle
from ssw.loader.workers.loads import LoadBook
from ssw.loader.workers.table import Worker, WorkerTable

S = WorkerState


def worker(state: WorkerState = S.STARTING, unit: str = "ssw-worker@m.service") -> Worker:
    return Worker("m", 1, unit, Path("/run/x.sock"), (0,), 1, state)


def table_with(life: Lifecycle) -> tuple[WorkerTable, list[Change]]:
    seen: list[Change] = []
    life.listeners.append(seen.append)
    return WorkerTable(lambda: None, life), seen


async def test_an_eviction_is_one_retirement_by_its_cause_and_the_log_calls_it_so() -> None:
    life = Lifecycle()
    table, seen = table_with(life)
    w = worker()
    table.add(w, "placed")
    table.move(w, S.READY, "healthy")
    w.retire_cause = "evicted"
    table.move(w, S.DRAINING, "evicted to make room for x")
    table.move(w, S.SLEEPING, "asleep")
    assert [c.retired for c in seen] == [False, True, False]
    assert [e.kind for e in life.events()] == ["ready", "evicted", "sleeping"]
    assert life.events()[1].text == "ssw-worker@m.service: ready -> draining (evicted to make room for x)"
    assert seen[1].served_s is not None and seen[1].served_s >= 0  # it served from ready to the drain


@pytest.mark.parametrize(
    ("path", "kinds"),
    [
        ([S.READY, S.FAILED], ["ready", "crashed"]),  # ended on its own while serving
        ([S.FAILED], ["failed"]),  # could not start
        ([S.READY, S.UNHEALTHY, S.READY], ["ready", "unhealthy", "ready"]),
    ],
)
async def test_the_log_names_what_happened(path: list[WorkerState], kinds: list[str]) -> None:
    life = Lifecycle()
    table, _ = table_with(life)
    w = worker()
    table.add(w, "placed")
    for state in path:
        table.move(w, state, "")
    assert [e.kind for e in life.events()] == kinds


async def test_a_cold_loads_phases_come_with_its_move_to_ready_only() -> None:
    life = Lifecycle()
    table, seen = table_with(life)
    w = worker()
    w.marks = {"requested": 1.0, "placed": 1.5, "evicted": 1.5, "unit_started": 2.0, "bound": 3.0, "healthy": 9.0}
    table.add(w, "placed")
    table.move(w, S.READY, "healthy")
    table.move(w, S.DRAINING, "idle")
    assert seen[0].phases is not None and seen[0].phases["engine_ready"] == 6.0
    assert seen[1].phases is None


async def test_a_wake_is_not_counted_as_a_retirement_though_the_sleeper_was_evicted_before() -> None:
    life = Lifecycle()
    table, seen = table_with(life)
    w = worker(S.SLEEPING)
    w.retire_cause = "evicted"
    table.add(w, "adopted")
    table.move(w, S.WAKING, "woken")
    table.move(w, S.READY, "awake")
    assert not any(c.retired for c in seen)


def test_load_changes_are_events_too_and_the_log_is_bounded() -> None:
    life = Lifecycle()
    book = LoadBook(lambda: None, life)
    rec = book.get("m")
    for _ in range(EVENTS_KEPT):
        book.move(rec, LoadState.LOADING, "requested")
        book.move(rec, LoadState.IDLE, "ready")
    events = life.events()
    assert len(events) == EVENTS_KEPT and events[-1].text == "model m: load loading -> idle (ready)"
    assert events[-1].unit is None and events[-1].kind == "idle"


async def test_the_metrics_count_each_change_by_its_labels() -> None:
    metrics = LoaderMetrics(lambda: {}, lambda: 0, lambda: [], lambda: {})
    life = Lifecycle()
    life.listeners.append(metrics.observe)
    life.check_listeners.append(metrics.check_failed)
    table = WorkerTable(lambda: None, life)
    w = worker()
    w.marks = {"requested": 1.0, "placed": 1.5, "evicted": 1.5, "unit_started": 2.0, "bound": 3.0, "healthy": 9.0}
    table.add(w, "placed")
    table.move(w, S.READY, "healthy")
    w.retire_cause, w.sleep_level = "idle", 1
    table.move(w, S.DRAINING, "idle")
    table.move(w, S.SLEEPING, "asleep")
    table.move(w, S.WAKING, "woken")
    table.move(w, S.READY, "awake")
    table.move(w, S.FAILED, "died")
    life.check_failed("m", "canary")
    book = LoadBook(lambda: None, life)
    rec = book.get("m")
    book.move(rec, LoadState.LOADING, "requested")
    book.move(rec, LoadState.COOLING_DOWN, "failed", deadline=1e12)
    r: CollectorRegistry = metrics.registry

    def value(name: str, **labels: str) -> float | None:
        return r.get_sample_value(name, labels)

    assert value("ssw_load_phase_duration_seconds_sum", model="m", phase="engine_ready") == 6.0
    assert value("ssw_worker_retirements_total", model="m", cause="idle") == 1
    assert value("ssw_sleep_duration_seconds_count", model="m", level="1") == 1
    assert value("ssw_wake_duration_seconds_count", model="m", level="1") == 1
    assert value("ssw_worker_residency_seconds_count", model="m") == 2  # served twice: before the sleep, after
    assert value("ssw_worker_failures_total", model="m", state="ready") == 1
    assert value("ssw_health_check_failures_total", model="m", check="canary") == 1
    assert value("ssw_load_setbacks_total", model="m", state="cooling_down") == 1
