"""What the batch runner does next for one model (pure, tested by tables).

Background work must never cost the game its tail latency, so a model gets
batch lines only while:
- it is ready (or is being loaded by someone else: then its lines wait);
- no interactive request queues at its workers (vLLM's waiting requests) or
  waits in the gateway for it; batch lines in flight finish, new ones wait;
- fewer than ``batch.concurrency_per_model`` of its lines run.

A model that is not loaded is loaded for batch work only if that evicts no
model used interactively within ``batch.protect_interactive_s`` (the loader
decides that, atomically with the placement); when it would, the lines wait
and the question is asked again later.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ModelState(enum.Enum):
    READY = "ready"
    LOADING = "loading"  # loading, waking, or backing off: someone will make it ready
    IDLE = "idle"  # not loaded (or asleep): a load is needed
    GONE = "gone"  # no longer in the registry
    FAILING = "failing"  # cooling down after failed loads


class Act(enum.Enum):
    RUN = "run"  # start `count` lines
    LOAD = "load"  # ask the loader for a load that evicts no interactively used model
    WAIT = "wait"  # nothing now
    FAIL = "fail"  # the model cannot serve these lines


@dataclass(frozen=True)
class View:
    state: ModelState
    pending: int  # lines of this model not yet done and not running
    running: int  # lines of this model in flight
    interactive_queued: int  # requests queued at its workers or waiting in the gateway
    refused_until: float = 0.0  # a protected load was refused; not asked again before
    now: float = 0.0


@dataclass(frozen=True)
class Decision:
    act: Act
    count: int = 0
    why: str = ""


def decide(view: View, concurrency: int) -> Decision:
    if view.pending == 0:
        return Decision(Act.WAIT, why="nothing pending")
    if view.state is ModelState.GONE:
        return Decision(Act.FAIL, why="the model is no longer served here")
    if view.state is ModelState.FAILING:
        return Decision(Act.WAIT, why="the model's loads fail; waiting for its cooldown")
    if view.state is ModelState.LOADING:
        return Decision(Act.WAIT, why="the model is loading")
    if view.state is ModelState.IDLE:
        if view.running:
            return Decision(Act.WAIT, why="lines in flight")
        if view.now < view.refused_until:
            return Decision(Act.WAIT, why="loading it would evict a model in interactive use")
        return Decision(Act.LOAD)
    if view.interactive_queued > 0:
        return Decision(Act.WAIT, why="interactive requests are queued: batch yields")
    room = concurrency - view.running
    if room <= 0:
        return Decision(Act.WAIT, why="at the model's batch concurrency")
    return Decision(Act.RUN, min(room, view.pending))
