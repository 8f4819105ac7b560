"""The lifecycle of workers and of model loads, written down (pure).

A worker's state and a model's load record change only along the transition
tables below; :class:`~ssw.loader.workers.table.WorkerTable` and :class:`~ssw.loader.workers.loads.LoadBook`
are the one place each applies them. What to do after a failure is decided by
:func:`ssw.loader.decide.recovery.recover`, from the kind of failure named here.
"""

from __future__ import annotations

import enum


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


# --- the kinds of failure ----------------------------------------------------------------


class Failure(enum.StrEnum):
    NO_ROOM = "no_room"  # placement found no GPU with room, even after evictions
    START_FAILED = "start_failed"  # the unit could not start, exited, or never became healthy
    DIED = "died"  # a worker that was ready ended on its own
    HUNG = "hung"  # a worker stopped answering /health or its canary, and was replaced


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
