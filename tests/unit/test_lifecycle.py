"""The lifecycle written down: transition tables, the recovery decision, the diagram."""

from __future__ import annotations

import re

import pytest

from ssw.common.states import (
    LOAD_TRANSITIONS,
    TERMINAL,
    WORKER_TRANSITIONS,
    Failure,
    IllegalTransition,
    LoadState,
    WorkerState,
    check_load_move,
    check_worker_move,
    mermaid,
)
from ssw.config import PlacementSettings
from ssw.loader.decide.recovery import CRASH_WINDOW_S, Recovery, backoff_s, recent, recover
from tests.harness.stack import REPO

W = WorkerState
L = LoadState


def test_every_state_has_a_row_and_terminal_states_lead_nowhere() -> None:
    assert set(WORKER_TRANSITIONS) == set(WorkerState)
    assert set(LOAD_TRANSITIONS) == set(LoadState)
    assert all(not WORKER_TRANSITIONS[s] for s in TERMINAL)
    # Every worker state but the terminal ones can reach a terminal one.
    for state in set(WorkerState) - TERMINAL:
        seen, frontier = {state}, [state]
        while frontier:
            for nxt in WORKER_TRANSITIONS[frontier.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        assert seen & TERMINAL, state


@pytest.mark.parametrize(
    ("current", "new"),
    [
        (W.STARTING, W.READY),
        (W.READY, W.DRAINING),
        (W.DRAINING, W.STOPPING),
        (W.STOPPING, W.GONE),
        (W.READY, W.UNHEALTHY),
        (W.UNHEALTHY, W.READY),
        (W.UNHEALTHY, W.STOPPING),  # a hung worker is replaced
        (W.STARTING, W.FAILED),
        (W.STOPPING, W.FAILED),  # stopped because its start failed
    ],
)
def test_allowed_worker_moves(current: WorkerState, new: WorkerState) -> None:
    check_worker_move(current, new)


@pytest.mark.parametrize(
    ("current", "new"),
    [
        (W.GONE, W.READY),  # nothing comes back from the dead: a new worker does
        (W.FAILED, W.STARTING),
        (W.DRAINING, W.READY),  # a drain is never undone: requests went elsewhere
        (W.STOPPING, W.READY),
        (W.STARTING, W.DRAINING),  # nothing to drain before it ever served
        (W.DRAINING, W.FAILED),  # on its way out anyway: it ends as gone
    ],
)
def test_impossible_worker_moves_are_refused(current: WorkerState, new: WorkerState) -> None:
    with pytest.raises(IllegalTransition):
        check_worker_move(current, new)


@pytest.mark.parametrize(
    ("current", "new", "allowed"),
    [
        (L.IDLE, L.LOADING, True),
        (L.LOADING, L.BACKING_OFF, True),
        (L.BACKING_OFF, L.LOADING, True),
        (L.LOADING, L.COOLING_DOWN, True),
        (L.COOLING_DOWN, L.IDLE, True),
        (L.IDLE, L.BACKING_OFF, True),  # a ready worker died
        (L.COOLING_DOWN, L.LOADING, False),  # refused until the cooldown is over
        (L.BACKING_OFF, L.COOLING_DOWN, False),
    ],
)
def test_load_moves(current: LoadState, new: LoadState, allowed: bool) -> None:
    if allowed:
        check_load_move(current, new)
    else:
        with pytest.raises(IllegalTransition):
            check_load_move(current, new)


SETTINGS = PlacementSettings(restart_backoff_s=2, restart_backoff_max_s=30, max_restarts=3, failed_load_cooldown_s=60)


@pytest.mark.parametrize(
    ("failure", "pinned", "earlier", "expected"),
    [
        # Pinned models always come back, with a backoff that doubles up to its cap.
        (Failure.START_FAILED, True, 0, Recovery("retry", 2.0)),
        (Failure.START_FAILED, True, 3, Recovery("retry", 16.0)),
        (Failure.START_FAILED, True, 40, Recovery("retry", 30.0)),
        (Failure.NO_ROOM, True, 1, Recovery("retry", 4.0)),
        (Failure.HUNG, True, 10, Recovery("retry", 30.0)),
        # Unpinned: a dead or hung worker is restarted, up to max_restarts in the window ...
        (Failure.DIED, False, 0, Recovery("retry", 2.0)),
        (Failure.HUNG, False, 2, Recovery("retry", 8.0)),
        (Failure.DIED, False, 3, Recovery("cool_down", 60.0)),
        # ... a model that cannot start is refused a while, not retried by every request ...
        (Failure.START_FAILED, False, 0, Recovery("cool_down", 60.0)),
        # ... and lack of room is nobody's fault: answered, not punished.
        (Failure.NO_ROOM, False, 5, Recovery("give_up", 0.0)),
    ],
)
def test_what_to_do_after_a_failure(failure: Failure, pinned: bool, earlier: int, expected: Recovery) -> None:
    decision = recover(failure, pinned, earlier, SETTINGS)
    assert (decision.action, decision.delay_s) == (expected.action, expected.delay_s)
    assert decision.reason


def test_backoff_never_overflows() -> None:
    assert backoff_s(10_000, SETTINGS) == 30.0


def test_failures_outside_the_window_are_forgotten() -> None:
    now = 10_000.0
    assert recent([now - CRASH_WINDOW_S - 1, now - 10, now - 1], now) == [now - 10, now - 1]


def test_the_readme_shows_the_lifecycle_as_the_tables_say() -> None:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```mermaid\n(.*?)```", readme, re.DOTALL)
    assert mermaid() + "\n" in blocks, "README.md's lifecycle diagram differs from ssw.common.states; paste mermaid()"
