"""Request rate and latency per model and priority over the last minutes, for the
status page's charts (pure): answered requests fall in 5-second buckets, each with
a latency histogram, so p50 and p95 come without keeping every sample.

Prometheus keeps the long history; this is what the page draws at once, with no
query engine on the host."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

BUCKET_S = 5
KEPT = 60  # buckets: five minutes
# Latency histogram bounds (seconds): fine where realtime requests are, coarse beyond.
BOUNDS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.4, 0.6, 1, 1.5, 2.5, 4, 6, 10, 20, 40, 80, 160)


@dataclass
class _Bucket:
    start: int
    count: int = 0
    errors: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS) + 1))


def quantile(counts: list[int], q: float) -> float | None:
    """The q-quantile of a bucketed latency (linear within its bucket, as Prometheus's
    histogram_quantile does); None without samples."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if seen + n >= rank and n > 0:
            low = BOUNDS[i - 1] if i > 0 else 0.0
            high = BOUNDS[i] if i < len(BOUNDS) else BOUNDS[-1] * 2
            return low + (high - low) * (rank - seen) / n
        seen += n
    return BOUNDS[-1] * 2


class Series:
    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], list[_Bucket]] = {}

    def add(self, model: str, priority: str, latency_s: float, error: bool, now: float) -> None:
        start = int(now // BUCKET_S) * BUCKET_S
        buckets = self._buckets.setdefault((model, priority), [])
        if not buckets or buckets[-1].start != start:
            buckets.append(_Bucket(start))
            del buckets[:-KEPT]
        b = buckets[-1]
        b.count += 1
        b.errors += error
        b.latency[bisect.bisect_left(BOUNDS, latency_s)] += 1

    def view(self, now: float) -> dict[str, object]:
        """Per "model/priority": rate (requests/s), p50 and p95 (ms) per bucket, oldest
        first, over the last KEPT buckets (the one in progress included)."""
        last = int(now // BUCKET_S) * BUCKET_S
        starts = [last - BUCKET_S * i for i in range(KEPT - 1, -1, -1)]
        out: dict[str, object] = {}
        for (model, priority), buckets in sorted(self._buckets.items()):
            by_start = {b.start: b for b in buckets}
            if not any(s in by_start for s in starts):
                continue
            rate, p50, p95, errors = [], [], [], 0
            for s in starts:
                b = by_start.get(s)
                span = BUCKET_S if s != last else max(now - s, 1.0)
                rate.append(round(b.count / span, 3) if b else 0.0)
                q50 = quantile(b.latency, 0.5) if b else None
                q95 = quantile(b.latency, 0.95) if b else None
                p50.append(None if q50 is None else round(q50 * 1000, 1))
                p95.append(None if q95 is None else round(q95 * 1000, 1))
                errors += b.errors if b else 0
            out[f"{model}/{priority}"] = {
                "model": model,
                "priority": priority,
                "rate": rate,
                "p50_ms": p50,
                "p95_ms": p95,
                "errors": errors,
            }
        return {"bucket_s": BUCKET_S, "start": starts[0], "series": out}
