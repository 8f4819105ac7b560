"""Where a model's load or wake stands (pure): its phase, since when, and how long
such a one took here before, which is all a client needs for an ETA."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ssw.common.contract import LoadProgress
from ssw.common.states import WorkerState
from ssw.loader.workers.table import PHASES, Worker


def progress(
    workers: Iterable[Worker],
    loading_since: float | None,
    load_s: float | None,
    wake_s: Callable[[int], float | None],
) -> LoadProgress | None:
    """The model's least advanced start or wake in progress; else, while its load record
    says loading (since ``loading_since``) with no worker placed yet, its placement.
    ``load_s`` is the median measured load, ``wake_s(level)`` the median wake from a level."""
    found: list[LoadProgress] = []
    for w in workers:
        if w.state is WorkerState.STARTING:
            phase = next((name for name, mark in PHASES if mark not in w.marks), PHASES[-1][0])
            # Measured loads run from the worker's placement (started_at) to ready.
            found.append(LoadProgress(kind="load", phase=phase, started=w.started_at, expected_s=load_s))
        elif w.state is WorkerState.WAKING:
            # A woken worker keeps its first load's marks: only those since the wake count.
            woke_at = w.marks.get("placed", w.state_since)
            phase = "waking" if w.marks.get("evicted", 0.0) >= woke_at else "eviction"
            found.append(
                LoadProgress(kind="wake", phase=phase, started=w.state_since, expected_s=wake_s(w.sleep_level))
            )
    if found:
        return min(found, key=lambda p: p.started)
    if loading_since is not None:
        return LoadProgress(kind="load", phase="placement", started=loading_since, expected_s=load_s)
    return None
