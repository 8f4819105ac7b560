"""The status page's charts (pure): rate and latency quantiles per model and priority."""

from __future__ import annotations

import pytest

from ssw.gateway.board.series import BOUNDS, BUCKET_S, KEPT, Series, quantile


@pytest.mark.parametrize(
    ("counts", "q", "expected"),
    [
        ([0] * (len(BOUNDS) + 1), 0.5, None),
        ([10] + [0] * len(BOUNDS), 0.5, 0.0025),  # all under 5 ms: halfway into the first bucket
        ([0, 0, 4] + [0] * (len(BOUNDS) - 2), 1.0, 0.02),
    ],
)
def test_quantiles_interpolate_within_a_bucket(counts: list[int], q: float, expected: float | None) -> None:
    assert quantile(counts, q) == (None if expected is None else pytest.approx(expected))


def test_each_model_and_priority_has_its_own_series_over_the_last_minutes() -> None:
    s = Series()
    t0 = 1_000_000.0
    for i in range(10):
        s.add("a", "realtime", 0.03, False, t0 + i * 0.1)
    s.add("a", "batch", 5.0, True, t0)
    s.add("old", "interactive", 1.0, False, t0 - BUCKET_S * (KEPT + 2))  # out of the window
    view = s.view(t0 + 1.0)
    series = view["series"]
    assert isinstance(series, dict) and set(series) == {"a/realtime", "a/batch"}
    rt = series["a/realtime"]
    assert len(rt["rate"]) == KEPT and rt["rate"][-1] > 0 and rt["rate"][0] == 0.0
    assert 20 <= rt["p50_ms"][-1] <= 35 and rt["p50_ms"][0] is None
    assert series["a/batch"]["errors"] == 1
