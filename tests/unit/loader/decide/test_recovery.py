"""What to do after a failure (pure, by table): retry after a backoff, cool down, or give up."""

from __future__ import annotations

import pytest

from ssw.common.states import (
    Failure,
    LoadState,
    WorkerState,
)
from ssw.config import PlacementSettings
from ssw.loader.decide.recovery import CRASH_WINDOW_S, Recovery, backoff_s, recent, recover

W = WorkerState


L = LoadState


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
