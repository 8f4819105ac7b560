"""The worker table: the one place worker states change."""

from __future__ import annotations

import pytest

from ssw.workers import load_phases


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
