"""Who waits for each worker, as the gateways tell it: the requests each gateway
process has in flight on each worker, by priority, and how many each has served.
Placement weighs a candidate victim by them, and a swap that lets its victim serve
its queue first counts what it served meanwhile here. Each gateway process reports
its own counts; a report not renewed within :data:`REPORT_TTL_S` is forgotten (a
gateway that died holds nothing in flight)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from ssw.common.contract import PRIORITY_RANK

# Gateways report at least every 2 s while anything is in flight.
REPORT_TTL_S = 10.0


@dataclass
class _Report:
    at: float  # monotonic
    in_flight: dict[str, dict[str, int]] = field(default_factory=dict)  # unit -> priority -> requests
    served: dict[str, int] = field(default_factory=dict)  # unit -> requests answered, ever


class Demand:
    def __init__(self) -> None:
        self._reports: dict[str, _Report] = {}
        self._changed = asyncio.Event()

    def report(self, reporter: str, in_flight: dict[str, dict[str, int]], served: dict[str, int]) -> None:
        self._reports[reporter] = _Report(time.monotonic(), in_flight, served)
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def _live(self) -> list[_Report]:
        now = time.monotonic()
        for reporter in [r for r, rep in self._reports.items() if now - rep.at > REPORT_TTL_S]:
            del self._reports[reporter]
        return list(self._reports.values())

    def waiting(self, unit: str) -> tuple[int, int | None]:
        """(requests in flight on the worker, the rank of the most urgent of them or None)."""
        count, rank = 0, None
        for rep in self._live():
            for priority, n in rep.in_flight.get(unit, {}).items():
                if n > 0:
                    count += n
                    r = PRIORITY_RANK.get(priority, PRIORITY_RANK["interactive"])
                    rank = r if rank is None else min(rank, r)
        return count, rank

    def served(self, unit: str) -> int:
        return sum(rep.served.get(unit, 0) for rep in self._live())

    async def wait_change(self, timeout: float) -> None:
        """Until the next report (or the timeout)."""
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
