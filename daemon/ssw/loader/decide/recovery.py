"""What to do after a model's load or worker failed (pure): retry after a backoff
that doubles, cool down, or give up, from the kind of failure, whether the model
is pinned, and how often it failed within the crash window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ssw.common.states import Failure
from ssw.config import PlacementSettings

CRASH_WINDOW_S = 600.0  # failures further apart than this do not add up


@dataclass(frozen=True)
class Recovery:
    action: Literal["retry", "cool_down", "give_up"]
    delay_s: float = 0.0  # retry: after this long; cool_down: refused this long
    reason: str = ""


def backoff_s(earlier_failures: int, settings: PlacementSettings) -> float:
    """restart_backoff_s, doubling with each earlier failure, capped."""
    first, cap = settings.restart_backoff_s, settings.restart_backoff_max_s
    # min() before the power: 2**1000 is fine for ints, not for floats.
    return float(min(first * 2 ** min(earlier_failures, 64), cap))


def recover(failure: Failure, pinned: bool, earlier_failures: int, settings: PlacementSettings) -> Recovery:
    """Restart now or later, cool down, or give up, for a model whose load or worker failed.

    ``earlier_failures`` counts the model's failures within CRASH_WINDOW_S before this one.
    """
    delay = backoff_s(earlier_failures, settings)
    if pinned:
        # Pinned models always come back, however long it takes; the cap keeps
        # a broken one from costing more than one attempt per restart_backoff_max_s.
        return Recovery("retry", delay, "pinned models are always restarted")
    if failure is Failure.NO_ROOM:
        # Not the model's fault, and a request may free room: answer, do not punish.
        return Recovery("give_up", 0.0, "no room on any GPU")
    if failure is Failure.START_FAILED:
        # Retrying at once would fail the same way and turn every request into a start.
        return Recovery("cool_down", settings.failed_load_cooldown_s, "its load failed")
    if earlier_failures >= settings.max_restarts:
        return Recovery(
            "cool_down",
            settings.failed_load_cooldown_s,
            f"its workers failed {earlier_failures + 1} times within {CRASH_WINDOW_S / 60:.0f} minutes",
        )
    return Recovery("retry", delay, "a worker that was ready is brought back")


def recent(failures: list[float], now: float) -> list[float]:
    """The failure times (monotonic) still inside the crash window."""
    return [t for t in failures if now - t < CRASH_WINDOW_S]
