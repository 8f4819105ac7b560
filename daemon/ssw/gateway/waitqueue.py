"""Requests held while their model loads: bounded per model, released in
priority order (realtime, interactive, batch; first come first served within
a tier). A waiter is one small future, so thousands cost little memory."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from ssw.common.contract import PRIORITY_RANK as PRIORITIES
from ssw.errors import BadRequest, SswError

DEFAULT_PRIORITY = "interactive"
# vLLM's priority scheduling serves lower values first.
VLLM_PRIORITY = {"realtime": -10, "interactive": 0, "batch": 10}


class QueueFull(SswError):
    status = 429
    type = "rate_limit_error"
    code = "too_many_waiting"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def parse_priority(value: str | None) -> str:
    if value is None or value == "":
        return DEFAULT_PRIORITY
    tier = value.strip().lower()
    if tier not in PRIORITIES:
        raise BadRequest(f"X-SSW-Priority must be one of {', '.join(PRIORITIES)}")
    return tier


@dataclass(order=True)
class Waiter:
    rank: int
    order: int
    model: str = field(compare=False)
    priority: str = field(compare=False)
    future: asyncio.Future[None] = field(compare=False)
    here_only: bool = field(default=False, compare=False)  # served by this host's workers only (a hop)


class WaitQueue:
    def __init__(self, limit: int, on_depth: Callable[[str, str, int], None] | None = None) -> None:
        self.limit = limit
        self._waiting: dict[str, list[Waiter]] = {}
        self._counter = itertools.count()
        self._on_depth = on_depth  # told a model's new depth per priority after every change

    def _changed(self, model: str) -> None:
        if self._on_depth is not None:
            for priority, n in self.depth_by_priority(model).items():
                self._on_depth(model, priority, n)

    def depth(self, model: str) -> int:
        return len(self._waiting.get(model, ()))

    def depth_by_priority(self, model: str) -> dict[str, int]:
        """Every priority, waiting or not (a gauge drops back to 0)."""
        out = dict.fromkeys(PRIORITIES, 0)
        for w in self._waiting.get(model, ()):
            out[w.priority] += 1
        return out

    def models(self) -> list[str]:
        return [m for m, ws in self._waiting.items() if ws]

    def add(self, model: str, priority: str, retry_after_s: int, here_only: bool = False) -> Waiter:
        """Queue a request; when the queue is full a more urgent request displaces
        the newest of the least urgent ones, which gets the 429 instead."""
        waiters = self._waiting.setdefault(model, [])
        waiter = Waiter(
            PRIORITIES[priority],
            next(self._counter),
            model,
            priority,
            asyncio.get_running_loop().create_future(),
            here_only,
        )
        if len(waiters) >= self.limit:
            victim = max(waiters)  # least urgent, then newest
            if victim.rank <= waiter.rank:
                raise QueueFull(f"{self.limit} requests already wait for '{model}'", retry_after_s)
            waiters.remove(victim)
            if not victim.future.done():
                victim.future.set_exception(
                    QueueFull(f"displaced by more urgent requests for '{model}'", retry_after_s)
                )
        waiters.append(waiter)
        self._changed(model)
        return waiter

    def discard(self, waiter: Waiter) -> None:
        waiters = self._waiting.get(waiter.model, [])
        if waiter in waiters:
            waiters.remove(waiter)
            self._changed(waiter.model)

    def release(self, model: str, here: bool = True) -> list[Waiter]:
        """Wake the model's waiters, most urgent first; returns them in that order. With
        ``here`` false (ready on another host only) those that wait for this host stay."""
        waiting = self._waiting.pop(model, [])
        if not here and any(w.here_only for w in waiting):
            self._waiting[model] = [w for w in waiting if w.here_only]
            waiting = [w for w in waiting if not w.here_only]
        waiters = sorted(waiting)
        for w in waiters:
            if not w.future.done():
                w.future.set_result(None)
        self._changed(model)
        return waiters

    def fail(self, model: str, exc: Exception) -> None:
        for w in self._waiting.pop(model, []):
            if not w.future.done():
                w.future.set_exception(exc)
        self._changed(model)
