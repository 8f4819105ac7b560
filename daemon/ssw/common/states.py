"""The lifecycle of workers and of model loads, written down (pure).

A worker's state and a model's load record change only along the transition
tables below; :class:`~ssw.loader.workers.table.WorkerTable` and :class:`~ssw.loader.workers.loads.LoadBook`
are the one place each applies them. What to do after a failure is decided
here too, by :func:`recover`, from the failure and the model's recent history.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from ssw.config import PlacementSettings

CRASH_WINDOW_S = 600.0  # failures further apart than this do not add up


class WorkerState(enum.StrEnum):
    STARTING = "starting"  # unit started, vLLM not answering /health yet
    READY = "ready"  # /health answers 200; requests are routed here
    UNHEALTHY = "unhealthy"  # was ready; /health or the canary fails; not routed
    DRAINING = "draining"  # not routed; in-flight requests finish, then it sleeps or its unit stops
    SLEEPING = "sleeping"  # its unit runs, its GPU memory is given back (weights in host RAM or dropped)
    WAKING = "waking"  # asked to wake; routed again once a 1-token canary passed
    STOPPING = "stopping"  # stop job issued: vLLM shutting down
    GONE = "gone"  # the unit ended after ssw asked it to (terminal)
    FAILED = "failed"  # the unit ended on its own or could not start (terminal)


# Which moves are allowed. A worker leaves the table on reaching a terminal state.
WORKER_TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.STARTING: frozenset({WorkerState.READY, WorkerState.STOPPING, WorkerState.FAILED}),
    WorkerState.READY: frozenset(
        {WorkerState.UNHEALTHY, WorkerState.DRAINING, WorkerState.STOPPING, WorkerState.FAILED}
    ),
    WorkerState.UNHEALTHY: frozenset(
        {WorkerState.READY, WorkerState.DRAINING, WorkerState.STOPPING, WorkerState.FAILED}
    ),
    # Drained to sleep: asleep once its GPU memory is seen free, else its unit is stopped.
    WorkerState.DRAINING: frozenset({WorkerState.SLEEPING, WorkerState.STOPPING, WorkerState.GONE}),
    WorkerState.SLEEPING: frozenset({WorkerState.WAKING, WorkerState.STOPPING, WorkerState.FAILED}),
    # A wake that fails (or whose canary fails) stops the unit; its model loads cold.
    WorkerState.WAKING: frozenset({WorkerState.READY, WorkerState.STOPPING, WorkerState.FAILED}),
    # A worker stopped because its start failed or it hung ends as failed.
    WorkerState.STOPPING: frozenset({WorkerState.GONE, WorkerState.FAILED}),
    WorkerState.GONE: frozenset(),
    WorkerState.FAILED: frozenset(),
}
TERMINAL = frozenset({WorkerState.GONE, WorkerState.FAILED})
# States whose worker still holds (or is about to hold) its GPU memory and counts
# against the model's replicas; DRAINING and STOPPING ones are on their way out.
LIVE = frozenset({WorkerState.STARTING, WorkerState.READY, WorkerState.UNHEALTHY, WorkerState.WAKING})
LEAVING = frozenset({WorkerState.DRAINING, WorkerState.STOPPING})
# Running units that hold host memory but (almost) no GPU memory: the warm tier.
ASLEEP = frozenset({WorkerState.SLEEPING})


class LoadState(enum.StrEnum):
    IDLE = "idle"  # nothing in progress: the model is loaded, or not
    LOADING = "loading"  # placing and starting its workers
    BACKING_OFF = "backing_off"  # a start failed or a worker died: the next attempt waits for the deadline
    COOLING_DOWN = "cooling_down"  # refused until the deadline after a failure that retrying would repeat


LOAD_TRANSITIONS: dict[LoadState, frozenset[LoadState]] = {
    LoadState.IDLE: frozenset({LoadState.LOADING, LoadState.BACKING_OFF, LoadState.COOLING_DOWN}),
    LoadState.LOADING: frozenset({LoadState.IDLE, LoadState.BACKING_OFF, LoadState.COOLING_DOWN}),
    LoadState.BACKING_OFF: frozenset({LoadState.LOADING, LoadState.IDLE}),
    LoadState.COOLING_DOWN: frozenset({LoadState.IDLE}),
}


class IllegalTransition(RuntimeError):
    """A move the tables do not allow: a bug in ssw, never applied."""


def check_worker_move(current: WorkerState, new: WorkerState) -> None:
    if new not in WORKER_TRANSITIONS[current]:
        raise IllegalTransition(f"worker {current.value} -> {new.value} is not an allowed transition")


def check_load_move(current: LoadState, new: LoadState) -> None:
    if new not in LOAD_TRANSITIONS[current]:
        raise IllegalTransition(f"load {current.value} -> {new.value} is not an allowed transition")


# --- what to do after a failure --------------------------------------------------------


class Failure(enum.StrEnum):
    NO_ROOM = "no_room"  # placement found no GPU with room, even after evictions
    START_FAILED = "start_failed"  # the unit could not start, exited, or never became healthy
    DIED = "died"  # a worker that was ready ended on its own
    HUNG = "hung"  # a worker stopped answering /health or its canary, and was replaced


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


# --- the diagram in the README ------------------------------------------------------------


def mermaid() -> str:
    """The two state machines as Mermaid state diagrams (a test keeps the README's copy equal)."""
    lines = ["stateDiagram-v2", "    direction LR", "    state worker {", "        [*] --> starting"]
    for state, targets in WORKER_TRANSITIONS.items():
        lines += [f"        {state.value} --> {target.value}" for target in sorted(targets)]
    lines += [f"        {state.value} --> [*]" for state in sorted(TERMINAL)]
    lines += ["    }", "    state load {", "        [*] --> idle"]
    for load_state, load_targets in LOAD_TRANSITIONS.items():
        lines += [f"        {load_state.value} --> {target.value}" for target in sorted(load_targets)]
    lines += ["    }"]
    return "\n".join(lines)
