"""The lifecycle written down: transition tables, and the diagram in the docs."""

from __future__ import annotations

import re

import pytest

from ssw.common.states import (
    LOAD_TRANSITIONS,
    TERMINAL,
    WORKER_TRANSITIONS,
    IllegalTransition,
    LoadState,
    WorkerState,
    check_load_move,
    check_worker_move,
    mermaid,
)
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


def test_the_docs_show_the_lifecycle_as_the_tables_say() -> None:
    page = (REPO / "docs" / "lifecycle.md").read_text()
    blocks = re.findall(r"```mermaid\n(.*?)```", page, re.DOTALL)
    assert mermaid() + "\n" in blocks, "docs/lifecycle.md's diagram differs from ssw.common.states; paste mermaid()"
