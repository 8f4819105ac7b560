"""Which worker of a pool serves the next request (pure)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


class RoundRobin:
    """Per model, each request starts one place further along the pool; the rest
    of the pool follows in order, as the failover sequence."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def order(self, model: str, pool: Sequence[T]) -> list[T]:
        if not pool:
            return []
        start = self._next.get(model, 0) % len(pool)
        self._next[model] = start + 1
        return list(pool[start:]) + list(pool[:start])


def least_outstanding(pool: Sequence[T], outstanding: Callable[[T], int], rr: RoundRobin, model: str) -> list[T]:
    """The replica with the fewest requests in flight first; round-robin breaks ties."""
    rotated = rr.order(model, pool)
    return sorted(rotated, key=outstanding)  # sorted() is stable: ties keep the rotation
